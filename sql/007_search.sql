-- ngx_chat_module schema, version 7: full-text search over messages.
--
-- A stored tsvector of the body for the text search configuration
-- 'simple' (no stemming, right for a platform whose users write in many
-- languages), GIN-indexed: the index finds rare words, and a frequent
-- word is checked row by row at no more than a comparison (chat_search).
-- chat_search_language may name another configuration; it is computed
-- from the body then, and needs its own index, made once by the operator:
--   CREATE INDEX CONCURRENTLY chat_messages_search_english ON chat_messages
--       USING gin (to_tsvector('english', body)) WHERE NOT deleted;
-- Deleted messages are not in the index (their body is empty anyway); an
-- edited message is found by its new text only (the column follows the
-- row).  Adding the column rewrites chat_messages once.

ALTER TABLE chat_messages ADD COLUMN search tsvector
    GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, body)) STORED;

CREATE INDEX chat_messages_search ON chat_messages
    USING gin (search) WHERE NOT deleted;


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
--
-- Newest first looks at each conversation's newest messages first (the
-- (conversation_id, seq) index, the stored tsvector as a cheap filter),
-- a window per conversation out of a budget of 20,000 rows (the setting
-- chat.search_window, for tests): a frequent
-- word fills the page there.  The page is exact when its last hit is
-- newer than every message a full window left unseen; otherwise (a rare
-- word), and for ranked search, the GIN index finds every hit.  A word
-- the statistics show is rare goes to the index at once.
CREATE FUNCTION chat_search(p_user text, p_service boolean, p_lang regconfig,
                            p_q text, p_conv bigint, p_cursor bigint,
                            p_limit int, p_ranked boolean)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_q       tsquery := chat_search_query(p_lang, p_q);
    v_simple  boolean := p_lang = 'simple'::regconfig;
    v_convs   bigint[];
    v_floors  bigint[];
    v_win     int;
    v_budget  int := coalesce(nullif(current_setting('chat.search_window',
                                                     true), '')::int, 20000);
    v_ids     bigint[];
    v_ranks   real[];
    v_bound   bigint;
    v_got     int;
    v_frequent boolean := false;
    v_rows    text;
    v_n       int;
    v_next    text;
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

    -- where the caller may read, and from which seq
    IF p_service AND p_conv IS NOT NULL THEN
        v_convs := ARRAY[p_conv];
        v_floors := ARRAY[0::bigint];

    ELSE
        SELECT array_agg(mb.conversation_id ORDER BY mb.conversation_id),
               array_agg(CASE WHEN cv.history = 'since_join'
                              THEN mb.joined_seq ELSE 0 END
                         ORDER BY mb.conversation_id)
        INTO v_convs, v_floors
        FROM chat_members mb
        JOIN chat_conversations cv ON cv.id = mb.conversation_id
        WHERE mb.user_id = p_user
          AND (p_conv IS NULL OR mb.conversation_id = p_conv);
    END IF;

    IF v_convs IS NULL THEN
        RETURN '{"results":[],"next":null}';
    END IF;

    -- A word rarer than every one of the column's most common elements
    -- (the statistics ANALYZE keeps) is for the index at once: reading
    -- the conversations' newest rows first would find too little.  No
    -- statistics yet: the newest rows first.
    IF NOT p_ranked AND v_simple THEN
        SELECT NOT EXISTS (SELECT 1 FROM pg_stats st
                           WHERE st.schemaname = current_schema()
                             AND st.tablename = 'chat_messages'
                             AND st.attname = 'search'
                             AND st.most_common_elems IS NOT NULL)
               OR EXISTS (
                   SELECT 1
                   FROM pg_stats st,
                        unnest(st.most_common_elems::text::text[]) e,
                        regexp_matches(v_q::text, '''((?:[^'']|'''')+)''(:\*)?',
                                       'g') w
                   WHERE st.schemaname = current_schema()
                     AND st.tablename = 'chat_messages'
                     AND st.attname = 'search'
                     AND (e = replace(w[1], '''''', '''')
                          OR (w[2] IS NOT NULL
                              AND starts_with(e, replace(w[1], '''''', '''')))))
        INTO v_frequent;
    END IF;

    IF NOT p_ranked AND v_simple AND v_frequent
       AND cardinality(v_convs) <= 2000
    THEN
        v_win := greatest(p_limit, v_budget / cardinality(v_convs));

        WITH win AS (
            SELECT u.c, y.id, y.hit
            FROM unnest(v_convs, v_floors) AS u (c, f)
            CROSS JOIN LATERAL (
                SELECT m.id, (NOT m.deleted AND m.search @@ v_q) AS hit
                FROM chat_messages m
                WHERE m.conversation_id = u.c AND m.seq > u.f
                  AND (p_cursor IS NULL OR m.id < p_cursor)
                ORDER BY m.seq DESC
                LIMIT v_win) y
        )
        SELECT (SELECT array_agg(t.id ORDER BY t.id DESC)
                FROM (SELECT w.id FROM win w WHERE w.hit
                      ORDER BY w.id DESC LIMIT p_limit) t),
               (SELECT max(p.lowest)
                FROM (SELECT min(w.id) AS lowest, count(*) AS n
                      FROM win w GROUP BY w.c) p
                WHERE p.n = v_win)
        INTO v_ids, v_bound;

        v_got := coalesce(cardinality(v_ids), 0);

        IF v_got = p_limit AND (v_bound IS NULL OR v_ids[p_limit] > v_bound)
           OR v_got < p_limit AND v_bound IS NULL
        THEN
            v_ids := coalesce(v_ids, '{}');

        ELSE
            v_ids := NULL;
        END IF;
    END IF;

    IF v_ids IS NULL THEN
        -- the index: every hit, then the caller's conversations (a plan
        -- that walked the conversations with the match as a filter would
        -- read them whole for a rare word)
        WITH hits AS MATERIALIZED (
            SELECT m.id, m.conversation_id AS c, m.seq,
                   CASE WHEN p_ranked THEN ts_rank(
                       CASE WHEN v_simple THEN m.search
                            ELSE to_tsvector(p_lang, m.body) END,
                       v_q) END AS rank
            FROM chat_messages m
            WHERE (CASE WHEN v_simple THEN m.search
                        ELSE to_tsvector(p_lang, m.body) END) @@ v_q
              AND NOT m.deleted
              AND (p_ranked OR p_cursor IS NULL OR m.id < p_cursor)
        )
        SELECT array_agg(x.id ORDER BY x.rank DESC NULLS LAST, x.id DESC),
               array_agg(x.rank ORDER BY x.rank DESC NULLS LAST, x.id DESC)
        INTO v_ids, v_ranks
        FROM (SELECT h.id, h.rank
              FROM hits h
              JOIN unnest(v_convs, v_floors) AS u (c, f)
                ON h.c = u.c AND h.seq > u.f
              ORDER BY h.rank DESC NULLS LAST, h.id DESC
              OFFSET CASE WHEN p_ranked THEN coalesce(p_cursor, 0) ELSE 0 END
              LIMIT p_limit) x;
    END IF;

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
                              THEN ',"rank":' || round(o.rank::numeric, 6)
                              ELSE '' END
                      || '}', ',' ORDER BY o.ord),
           count(*),
           CASE WHEN p_ranked THEN (coalesce(p_cursor, 0) + count(*))::text
                ELSE min(o.id)::text END
    INTO v_rows, v_n, v_next
    FROM unnest(v_ids, v_ranks) WITH ORDINALITY AS o (id, rank, ord)
    JOIN chat_messages m ON m.id = o.id;

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


-- The conversation list as version 4's, with a 'since_join' member's
-- last_message taken from after it joined (a message from before is not
-- its to read).
CREATE OR REPLACE FUNCTION chat_list_conversations(p_user text, p_before_ts bigint,
                                        p_before_id bigint, p_limit int)
RETURNS text
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT c.id, c.last_activity, c.last_seq, mb.read_seq,
               CASE WHEN c.history = 'since_join' THEN mb.joined_seq
                    ELSE 0 END AS floor
        FROM chat_members mb
        JOIN chat_conversations c ON c.id = mb.conversation_id
        WHERE mb.user_id = p_user
          AND (p_before_id IS NULL
               OR (c.last_activity, c.id)
                  < (to_timestamp(p_before_ts / 1000000.0), p_before_id))
        ORDER BY c.last_activity DESC, c.id DESC
        LIMIT p_limit
    ), rows AS (
        SELECT p.*, row_number() OVER (ORDER BY p.last_activity DESC,
                                       p.id DESC) AS rn
        FROM page p
    )
    SELECT json_build_object(
        'conversations', coalesce((
            SELECT json_agg(
                (chat_conversation_json(r.id)::jsonb
                 || jsonb_build_object(
                     'last_message',
                     (SELECT chat_message_json(m)::jsonb
                      FROM chat_messages m
                      WHERE m.conversation_id = r.id AND m.seq > r.floor
                      ORDER BY m.seq DESC LIMIT 1),
                     'unread_count',
                     chat_unread(r.id, r.last_seq, r.read_seq)))
                ORDER BY r.rn)
            FROM rows r), '[]'::json),
        'next', (SELECT CASE WHEN count(*) = p_limit THEN
                     (SELECT (extract(epoch FROM r.last_activity)
                              * 1000000)::bigint || ':' || r.id
                      FROM rows r ORDER BY r.rn DESC LIMIT 1)
                 END
                 FROM rows))::text
$$;


INSERT INTO chat_schema_version (version) VALUES (7);
