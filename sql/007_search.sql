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


-- The words of what the user typed, every one required, the last one as
-- a prefix (it may still be being typed); NULL when there is no word.
CREATE FUNCTION chat_search_query(p_lang regconfig, p_q text)
RETURNS tsquery
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN count(*) = 0 THEN NULL
                ELSE to_tsquery(p_lang, string_agg(
                         quote_literal(w.word)
                         || CASE WHEN w.last THEN ':*' ELSE '' END,
                         ' & ' ORDER BY w.ord))
           END
    FROM (SELECT x.word, x.ord, x.ord = max(x.ord) OVER () AS last
          FROM (SELECT m[1] AS word, row_number() OVER () AS ord
                FROM regexp_matches(left(p_q, 256), '[[:alnum:]_]+', 'g') m
                LIMIT 16) x) w
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
        SELECT h.*, row_number() OVER (ORDER BY
                   CASE WHEN p_ranked THEN h.rank END DESC NULLS LAST,
                   h.id DESC) AS rn
        FROM hits h
        ORDER BY CASE WHEN p_ranked THEN h.rank END DESC NULLS LAST, h.id DESC
        OFFSET CASE WHEN p_ranked THEN coalesce(p_cursor, 0) ELSE 0 END
        LIMIT p_limit
    )
    SELECT string_agg('{"message":' || chat_message_json(m)
                      || ',"snippet":' || to_json(ts_headline(p_lang, m.body, v_q,
                             'StartSel=<mark>, StopSel=</mark>, MaxWords=24, '
                             || 'MinWords=8, MaxFragments=2'))::text
                      || CASE WHEN p_ranked
                              THEN ',"rank":' || round(p.rank::numeric, 6)
                              ELSE '' END
                      || '}', ',' ORDER BY p.rn),
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
