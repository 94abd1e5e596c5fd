-- ngx_chat_module schema, version 7: full-text search over messages.
--
-- One expression index over the body, for the text search configuration
-- chat_search_language names ('simple' by default: no stemming, right for
-- a platform whose users write in many languages).  Another configuration
-- works the same but needs its own index, made once by the operator:
--   CREATE INDEX CONCURRENTLY chat_messages_search_english ON chat_messages
--       USING gin (to_tsvector('english', body)) WHERE NOT deleted;
-- Deleted messages are not in it (their body is empty anyway); an edited
-- message is found by its new text only (the index follows the row).

CREATE INDEX chat_messages_search ON chat_messages
    USING gin (to_tsvector('simple', body)) WHERE NOT deleted;


-- What the user typed, split into words by the same parser that indexes
-- bodies (an address, a version number, a date stays one word as it is
-- in the index); every word required, the last one as a prefix when it
-- has two characters or more (it may still be being typed; one letter
-- would match half the store).  No input raises: the words go through
-- plainto_tsquery, the last one quoted with nothing that can end the
-- quote.  NULL when there is no word.
CREATE FUNCTION chat_search_query(p_lang regconfig, p_q text)
RETURNS tsquery
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_words  text[];
    v_n      int;
    v_last   text;
    v_q      tsquery;
    v_p      tsquery;
BEGIN
    SELECT array_agg(t.token ORDER BY t.ord) INTO v_words
    FROM (SELECT p.token, row_number() OVER () AS ord
          FROM ts_parse('default', left(p_q, 256)) p
          WHERE p.tokid <> 12
          LIMIT 16) t;

    v_n := coalesce(cardinality(v_words), 0);

    IF v_n = 0 THEN
        RETURN NULL;
    END IF;

    IF v_n > 1 THEN
        v_q := plainto_tsquery(p_lang,
                               array_to_string(v_words[1:v_n - 1], ' '));
    END IF;

    v_last := translate(v_words[v_n], E'\\''', '');

    IF char_length(v_last) >= 2 THEN
        v_p := to_tsquery(p_lang, '''' || v_last || ''':*');
    ELSE
        v_p := plainto_tsquery(p_lang, v_last);
    END IF;

    RETURN CASE WHEN v_q IS NULL OR numnode(v_q) = 0 THEN v_p
                WHEN numnode(v_p) = 0 THEN v_q
                ELSE v_q && v_p END;
END;
$$;


-- GET /search: messages the caller may read (a member now, and for a
-- 'since_join' conversation only after it joined) that match, in one
-- conversation or in all of the caller's, newest first (keyset: the
-- cursor is the last message id) or ranked (the cursor is an offset);
-- highlighted snippets only for the page returned.  NULL: no such
-- conversation; 'forbidden': not a member of it.
CREATE FUNCTION chat_search(p_user text, p_service boolean, p_lang regconfig,
                            p_q text, p_conv bigint, p_cursor bigint,
                            p_limit int, p_ranked boolean)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_q     tsquery := chat_search_query(p_lang, p_q);
    v_rows  text;
    v_n     int;
    v_next  text;
BEGIN
    IF p_conv IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM chat_conversations c WHERE c.id = p_conv)
        THEN
            RETURN NULL;
        END IF;

        IF NOT p_service AND NOT EXISTS (
               SELECT 1 FROM chat_members mb
               WHERE mb.conversation_id = p_conv AND mb.user_id = p_user)
        THEN
            RETURN 'forbidden';
        END IF;
    END IF;

    IF v_q IS NULL OR numnode(v_q) = 0 THEN
        RETURN '{"results":[],"next":null}';
    END IF;

    WITH mine AS (
        -- where the caller may read, and from which seq
        SELECT mb.conversation_id AS c,
               CASE WHEN cv.history = 'since_join' THEN mb.joined_seq
                    ELSE 0 END AS floor
        FROM chat_members mb
        JOIN chat_conversations cv ON cv.id = mb.conversation_id
        WHERE mb.user_id = p_user
          AND (p_conv IS NULL OR mb.conversation_id = p_conv)
          AND NOT (p_service AND p_conv IS NOT NULL)
        UNION ALL
        SELECT p_conv, 0 WHERE p_service AND p_conv IS NOT NULL
    ), hits AS (
        SELECT m.id, m.conversation_id, m.seq,
               CASE WHEN p_ranked
                    THEN ts_rank(to_tsvector(p_lang, m.body), v_q) END AS rank
        FROM chat_messages m
        JOIN mine ON mine.c = m.conversation_id AND m.seq > mine.floor
        WHERE to_tsvector(p_lang, m.body) @@ v_q AND NOT m.deleted
          AND (p_ranked OR p_cursor IS NULL OR m.id < p_cursor)
    ), page AS (
        SELECT h.*
        FROM hits h
        ORDER BY CASE WHEN p_ranked THEN h.rank END DESC NULLS LAST, h.id DESC
        OFFSET CASE WHEN p_ranked THEN coalesce(p_cursor, 0) ELSE 0 END
        LIMIT p_limit
    )
    -- the snippet is text made HTML: the body is escaped, and only the
    -- highlight (marked by two private-use characters the body cannot
    -- keep) becomes <mark>
    SELECT string_agg('{"message":' || chat_message_json(m)
                      || ',"snippet":' || to_json(replace(replace(replace(
                             replace(replace(replace(ts_headline(p_lang,
                                 translate(m.body, U&'\E000\E001', ''), v_q,
                                 'StartSel=' || U&'\E000' || ', StopSel='
                                 || U&'\E001' || ', MaxWords=24, MinWords=8, '
                                 || 'MaxFragments=2'),
                             '&', '&amp;'), '<', '&lt;'), '>', '&gt;'),
                             '"', '&quot;'),
                             U&'\E000', '<mark>'), U&'\E001', '</mark>'))::text
                      || CASE WHEN p_ranked
                              THEN ',"rank":' || round(p.rank::numeric, 6)
                              ELSE '' END
                      || '}', ','
                      ORDER BY CASE WHEN p_ranked THEN p.rank END
                               DESC NULLS LAST, p.id DESC),
           count(*),
           CASE WHEN p_ranked THEN (coalesce(p_cursor, 0) + count(*))::text
                ELSE min(p.id)::text END
    INTO v_rows, v_n, v_next
    FROM page p JOIN chat_messages m ON m.id = p.id;

    RETURN '{"results":[' || coalesce(v_rows, '') || '],"next":'
           || CASE WHEN v_n = p_limit THEN '"' || v_next || '"'
                   ELSE 'null' END
           || '}';
END;
$$;


-- the language is a parameter: only a plan made for its value can use the
-- expression index of that configuration
ALTER FUNCTION chat_search(text, boolean, regconfig, text, bigint, bigint,
                           int, boolean)
    SET plan_cache_mode = force_custom_plan;


INSERT INTO chat_schema_version (version) VALUES (7);
