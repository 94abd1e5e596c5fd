-- ngx_chat_module schema, version 2: a cheaper send path.
--
-- Measured with bench/ (dm at 10-16k msg/s): batches grow to hundreds of
-- items under load, and two parts of chat_send_batch grew with the square
-- of the batch: the join of every item with the locked conversations and
-- with the prior-send probe ran as nested loops over CTE scans.  The locked
-- conversations are now a map (jsonb object, binary search) built by a first
-- statement, and the prior-send probe is a LATERAL index probe per item.
--
-- Text keys that are only ever compared for equality or sorted for
-- stable output use the "C" collation: the database's C.UTF-8 is codepoint
-- order as well, but PostgreSQL compares it through strcoll(); "C" is a
-- memcmp().  Every index lookup of a send compares such keys.

ALTER TABLE chat_messages
    ALTER COLUMN sender TYPE text COLLATE "C",
    ALTER COLUMN client_msg_id TYPE text COLLATE "C";

ALTER TABLE chat_members
    ALTER COLUMN user_id TYPE text COLLATE "C";

ALTER TABLE chat_conversations
    ALTER COLUMN direct_key TYPE text COLLATE "C";

CREATE OR REPLACE FUNCTION chat_send_batch(p_items jsonb)
RETURNS TABLE (o_idx int, o_status text, o_gseq bigint, o_conv bigint,
               o_message text, o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_want    int;
    v_got     int;
    v_clk     bigint;
    v_locked  jsonb;
    r_idx     int[];
    r_status  text[];
    r_conv    bigint[];
    r_seq     bigint[];
    r_msg     text[];
    r_gseq    bigint[];
    r_ev      text[];
BEGIN
    -- the conversations of the batch that nobody else holds, with their
    -- last_seq as locked (the newest version): a map, so that every item
    -- finds its row in O(log n) rather than by a join the planner would
    -- run as a nested loop
    SELECT coalesce(jsonb_object_agg(l.id, l.last_seq), '{}')
    INTO v_locked
    FROM (SELECT c.id, c.last_seq FROM chat_conversations c
          WHERE c.id = ANY (ARRAY(
                    SELECT DISTINCT (e ->> 'conversation_id')::bigint
                    FROM jsonb_array_elements(p_items) e))
          ORDER BY c.id
          FOR UPDATE SKIP LOCKED) l;

    WITH items AS (
        SELECT i.ord::int AS idx,
               i.e ->> 'sender' AS sender,
               (i.e ->> 'conversation_id')::bigint AS conv,
               i.e ->> 'client_msg_id' AS cmid,
               i.e ->> 'body' AS body,
               coalesce(i.e ->> 'format', 'text') AS format,
               (i.e ->> 'reply_to')::bigint AS reply_to,
               coalesce(i.e -> 'attachments', '[]'::jsonb) AS attachments
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS i (e, ord)
    ), classified AS (
        -- every check is a LATERAL index probe per item: the planner
        -- would otherwise hash whole tables for an unknown item count
        SELECT it.*, (v_locked ->> it.conv::text)::bigint AS last_seq, p.m,
            CASE
            WHEN p.found THEN
                CASE WHEN (p.m).conversation_id = it.conv THEN 'dup'
                     ELSE 'conflict' END
            WHEN NOT v_locked ? it.conv::text THEN
                CASE WHEN ex.ok THEN 'busy' ELSE 'not_found' END
            WHEN mem.ok IS NULL THEN 'forbidden'
            WHEN it.reply_to IS NOT NULL AND rt.ok IS NULL
                THEN 'bad_reply_to'
            ELSE 'ok' END AS status
        FROM items it
        LEFT JOIN LATERAL (SELECT true AS found, m FROM chat_messages m
                           WHERE m.sender = it.sender
                             AND m.client_msg_id = it.cmid) p ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_conversations c
                           WHERE c.id = it.conv) ex ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_members mb
                           WHERE mb.conversation_id = it.conv
                             AND mb.user_id = it.sender) mem ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_messages m
                           WHERE m.id = it.reply_to
                             AND m.conversation_id = it.conv) rt ON true
    ), numbered AS (
        SELECT c.idx, c.conv, c.sender, c.cmid, c.body, c.format, c.reply_to,
               c.attachments,
               c.last_seq + row_number() OVER (PARTITION BY c.conv
                                               ORDER BY c.idx) AS seq
        FROM classified c WHERE c.status = 'ok'
    ), ins AS (
        INSERT INTO chat_messages AS m
            (conversation_id, seq, sender, client_msg_id, body, format,
             reply_to, attachments)
        SELECT n.conv, n.seq, n.sender, n.cmid, n.body, n.format,
               n.reply_to, n.attachments
        FROM numbered n ORDER BY n.idx
        ON CONFLICT (sender, client_msg_id) DO NOTHING
        RETURNING m.*
    ), upd AS (
        UPDATE chat_conversations c
        SET last_seq = x.top, last_activity = clock_timestamp()
        FROM (SELECT n.conv, max(n.seq) AS top FROM numbered n
              GROUP BY n.conv) x
        WHERE c.id = x.conv
        RETURNING c.id
    )
    SELECT array_agg(c.idx ORDER BY c.idx),
           array_agg(c.status ORDER BY c.idx),
           array_agg(c.conv ORDER BY c.idx),
           array_agg(i.seq ORDER BY c.idx),
           array_agg(CASE c.status
                     WHEN 'ok' THEN chat_message_json(ROW(i.*)::chat_messages)
                     WHEN 'dup' THEN chat_message_json(c.m)
                     END ORDER BY c.idx),
           count(*) FILTER (WHERE c.status = 'ok'),
           count(i.id),
           (SELECT count(*) FROM upd)
    INTO r_idx, r_status, r_conv, r_seq, r_msg, v_want, v_got
    FROM classified c
    LEFT JOIN ins i
      ON c.status = 'ok' AND i.sender = c.sender AND i.client_msg_id = c.cmid;

    IF v_got <> v_want THEN
        -- another conversation's transaction stored the same
        -- client_msg_id first: let the module retry the batch
        RAISE EXCEPTION 'chat: concurrent duplicate client_msg_id'
              USING ERRCODE = '40001';
    END IF;

    IF v_want > 0 THEN
        -- the clock is taken last and held to commit: gseq order is
        -- commit order
        UPDATE chat_clock SET v = v + v_want RETURNING v - v_want INTO v_clk;

        SELECT array_agg(g ORDER BY u.idx), array_agg(ev ORDER BY u.idx)
        INTO r_gseq, r_ev
        FROM (SELECT u.idx,
                     CASE WHEN u.status = 'ok' THEN
                         v_clk + count(*) FILTER (WHERE u.status = 'ok')
                                 OVER (ORDER BY u.idx)
                     END AS g,
                     CASE WHEN u.status = 'ok' THEN
                         '{"kind":"message.new","conversation_id":"'
                         || u.conv || '","seq":' || u.seq
                         || ',"message":' || u.msg || '}'
                     END AS ev
              FROM unnest(r_idx, r_status, r_conv, r_seq, r_msg)
                   AS u (idx, status, conv, seq, msg)) u;

        INSERT INTO chat_events (gseq, conversation_id, kind, payload)
        SELECT g, c, 'message.new', p
        FROM unnest(r_gseq, r_conv, r_ev) AS u (g, c, p)
        WHERE g IS NOT NULL;
    END IF;

    RETURN QUERY SELECT * FROM unnest(r_idx, r_status, r_gseq, r_conv,
                                      r_msg, r_ev);
END;
$$;


INSERT INTO chat_schema_version (version) VALUES (2);
