-- ngx_chat_module schema, version 4: live state.
--
-- Typing and presence live in the module's shared zone and are never
-- stored as events; only the time a user was last seen survives a
-- restart, written once per offline transition (not per connection).

CREATE TABLE chat_presence (
    user_id    text PRIMARY KEY,
    last_seen  timestamptz NOT NULL
);



-- Receipts.  chat_members.delivered_seq / read_seq are each member's
-- positions; they only grow.  The module coalesces acks and reads in each
-- worker and writes them in one transaction per flush interval, two steps
-- like a send batch (the receipt events are durable and take positions):
--   1. chat_receipt_stage(): move the positions, one receipt event object
--      per conversation where one moved;
--   2. chat_receipt_events(): those events at the reserved positions.
-- In conversations of more than p_max members the positions are stored
-- and no event is made (clients read them with GET /conversations/{id}).
-- Member rows another transaction holds are skipped, not waited for (a
-- send marks its sender's row, in no particular order): they come back
-- as rows without an event and the module retries them at the next flush.
-- Items: [[conversation, user, delivered, read, as-of position], ...];
-- positions past the conversation's last message are cut to it (a read to
-- the last message as of its position); reading marks delivered too.
-- Positions are updated in place many times a second: room in each page
-- lets PostgreSQL do it without touching the indexes (HOT updates; the
-- positions are in no index).  Pages written before this keep their fill.
ALTER TABLE chat_members SET (fillfactor = 70);

CREATE FUNCTION chat_receipt_stage(p_key bigint, p_holder bigint,
                                   p_items jsonb, p_max int)
RETURNS TABLE (o_conv bigint, o_event text, o_user text,
               o_delivered bigint, o_read bigint, o_asof bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

    -- Row by row through the primary keys (LATERAL ... LIMIT 1, and the
    -- function's settings below): a plan that hashes chat_members or
    -- chat_conversations is cheap on a new installation and a disaster on
    -- a big one, and the plan cache would keep it.
    RETURN QUERY
    WITH it AS (
        SELECT (e ->> 0)::bigint AS c, e ->> 1 AS u,
               (e ->> 2)::bigint AS d, (e ->> 3)::bigint AS r,
               coalesce((e ->> 4)::bigint, 0) AS a
        FROM jsonb_array_elements(p_items) e
    ), base AS MATERIALIZED (
        SELECT it.c, it.u, it.d, it.r, it.a, cv.last_seq,
               mb.delivered_seq AS md, mb.read_seq AS mr
        FROM it
        CROSS JOIN LATERAL (SELECT c.last_seq FROM chat_conversations c
                            WHERE c.id = it.c LIMIT 1) cv
        CROSS JOIN LATERAL (SELECT x.delivered_seq, x.read_seq
                            FROM chat_members x
                            WHERE x.conversation_id = it.c
                              AND x.user_id = it.u LIMIT 1) mb
    ), cut AS MATERIALIZED (
        -- a read that moves is cut to the last message as of when it came
        -- (the module's position a): not to one committed after it
        SELECT b.c, b.u, b.d, b.a, b.last_seq, b.md, b.mr,
               CASE WHEN b.r <= b.mr OR b.a = 0
                    THEN least(b.r, b.last_seq)
                    ELSE least(b.r, b.last_seq, coalesce(
                        (SELECT coalesce(m.seq,
                                         (e.payload::jsonb ->> 'seq')::bigint)
                         FROM chat_events e
                         LEFT JOIN chat_messages m ON m.id = e.message_id
                         WHERE e.conversation_id = b.c AND e.gseq <= b.a
                           AND e.kind = 'message.new'
                         ORDER BY e.gseq DESC LIMIT 1), b.last_seq))
               END AS r
        FROM base b
    ), moving AS MATERIALIZED (
        SELECT x.c, x.u, x.d, x.r, x.a
        FROM (SELECT k.c, k.u, k.a, k.r, k.md, k.mr,
                     least(greatest(k.d, k.r), k.last_seq) AS d
              FROM cut k) x
        WHERE x.d > x.md OR x.r > x.mr
    ), locked AS MATERIALIZED (
        -- each row locked if nobody holds it (got), in key order; every
        -- step joins by key or walks one list: nothing here is quadratic
        SELECT m.c, m.u, m.d, m.r, m.a, l.c IS NOT NULL AS got
        FROM (SELECT * FROM moving ORDER BY c, u) m
        LEFT JOIN LATERAL (SELECT mb.conversation_id AS c
                           FROM chat_members mb
                           WHERE mb.conversation_id = m.c
                             AND mb.user_id = m.u
                           FOR UPDATE SKIP LOCKED) l ON true
    ), upd AS (
        UPDATE chat_members mb
        SET delivered_seq = greatest(mb.delivered_seq, l.d),
            read_seq = greatest(mb.read_seq, l.r)
        FROM locked l
        WHERE l.got AND mb.conversation_id = l.c AND mb.user_id = l.u
          AND (l.d > mb.delivered_seq OR l.r > mb.read_seq)
        RETURNING mb.conversation_id AS c, mb.user_id AS u,
                  mb.delivered_seq AS d, mb.read_seq AS r
    )
    -- conversations of more than p_max members store the positions but
    -- announce nothing (every ack of every member, to every member, would
    -- be members^2); they come back as rows with neither event nor user
    SELECT x.c,
           CASE WHEN (SELECT c.member_count FROM chat_conversations c
                      WHERE c.id = x.c) <= p_max
                THEN x.ev END,
           NULL::text, NULL::bigint, NULL::bigint, NULL::bigint
    FROM (SELECT upd.c,
                 '{"kind":"receipt","conversation_id":"' || upd.c
                 || '","receipts":['
                 || string_agg('{"user":' || to_json(upd.u)::text
                               || ',"delivered_seq":' || upd.d
                               || ',"read_seq":' || upd.r || '}', ','
                               ORDER BY upd.u)
                 || ']}' AS ev
          FROM upd GROUP BY upd.c) x
    UNION ALL
    SELECT l.c, NULL, l.u, l.d, l.r, l.a
    FROM locked l
    WHERE NOT l.got
    ORDER BY 1, 2;
END;
$$;


ALTER FUNCTION chat_receipt_stage(bigint, bigint, jsonb, int)
    SET enable_hashjoin = off;
ALTER FUNCTION chat_receipt_stage(bigint, bigint, jsonb, int)
    SET enable_mergejoin = off;


CREATE FUNCTION chat_receipt_events(p_base bigint, p_events jsonb)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO chat_events (gseq, conversation_id, kind, payload)
    SELECT p_base + e.ord - 1, (e.v ->> 0)::bigint, 'receipt', e.v ->> 1
    FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e (v, ord)
$$;


-- Unread: the messages after my read position that are not mine and not
-- deleted.  A send moves its sender's read position to the message in the
-- same transaction (chat_send_stage below), so none of mine ever lies
-- after it, and the count is last_seq - read_seq less the deleted ones
-- after read_seq: O(1) per conversation with the partial index, however
-- deep the backlog.
CREATE INDEX chat_messages_deleted ON chat_messages (conversation_id, seq)
WHERE deleted;

-- The number of members, kept by a trigger: which conversations are
-- small enough for presence is asked at every join, by key.
ALTER TABLE chat_conversations ADD COLUMN member_count int NOT NULL DEFAULT 0;

UPDATE chat_conversations c
SET member_count = (SELECT count(*) FROM chat_members m
                    WHERE m.conversation_id = c.id);

CREATE FUNCTION chat_member_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE chat_conversations SET member_count = member_count + 1
        WHERE id = NEW.conversation_id;
    ELSE
        UPDATE chat_conversations SET member_count = member_count - 1
        WHERE id = OLD.conversation_id;
    END IF;

    RETURN NULL;
END;
$$;

CREATE TRIGGER chat_member_count AFTER INSERT OR DELETE ON chat_members
FOR EACH ROW EXECUTE FUNCTION chat_member_count();

-- Existing members: as if each had read up to their own last message, as
-- a send does from now on (the count above relies on it).
UPDATE chat_members mb
SET read_seq = greatest(mb.read_seq, y.s),
    delivered_seq = greatest(mb.delivered_seq, y.s)
FROM (SELECT m.conversation_id AS c, m.sender AS u, max(m.seq) AS s
      FROM chat_messages m GROUP BY 1, 2) y
WHERE mb.conversation_id = y.c AND mb.user_id = y.u
  AND mb.read_seq < y.s;

CREATE FUNCTION chat_unread(p_conv bigint, p_last bigint, p_read bigint)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT greatest(p_last - p_read, 0)
           - (SELECT count(*) FROM chat_messages m
              WHERE m.conversation_id = p_conv AND m.deleted
                AND m.seq > p_read)
$$;


-- Mentions: user ids named by a send ("mentions"), kept when they are
-- other members of the conversation; in the message object only when
-- there are some.
ALTER TABLE chat_messages ADD COLUMN mentions text[] NOT NULL DEFAULT '{}';

CREATE OR REPLACE FUNCTION chat_message_json(m chat_messages) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"id":"' || m.id
        || '","conversation_id":"' || m.conversation_id
        || '","seq":' || m.seq
        || ',"sender":' || to_json(m.sender)::text
        || ',"created_at":"' || chat_ts(m.created_at)
        || '","client_msg_id":' || to_json(m.client_msg_id)::text
        || ',"body":' || CASE WHEN m.deleted THEN '""'
                              ELSE to_json(m.body)::text END
        || ',"format":"' || m.format
        || '","reply_to":' || coalesce('"' || m.reply_to || '"', 'null')
        || ',"attachments":' || m.attachments::text
        || ',"edited_at":' || coalesce('"' || chat_ts(m.edited_at) || '"',
                                       'null')
        || ',"deleted":' || m.deleted
        || CASE WHEN cardinality(m.mentions) > 0
                THEN ',"mentions":' || to_json(m.mentions)::text
                ELSE '' END
        || '}'
$$;

ALTER FUNCTION chat_send_stage(bigint, bigint, jsonb)
    RENAME TO chat_send_stage_v3;

CREATE TYPE chat_send_row AS (o_idx int, o_status text, o_conv bigint,
                              o_id bigint, o_message text, o_event text);

-- Step 1 of a send batch, as in version 3, and then the senders' read
-- (and delivered) positions moved to their messages.  Only sends that
-- hold the conversation's row lock touch a sender's member row here, and
-- receipts skip rows that are held, so this waits for nobody but a
-- receipt flush that is about to commit.
CREATE FUNCTION chat_send_stage(p_key bigint, p_holder bigint,
                                p_items jsonb)
RETURNS TABLE (o_idx int, o_status text, o_conv bigint, o_id bigint,
               o_message text, o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_rows  chat_send_row[];
BEGIN
    SELECT array_agg(ROW(x.*)::chat_send_row ORDER BY x.o_idx) INTO v_rows
    FROM chat_send_stage_v3(p_key, p_holder, p_items) x;

    -- mentions of the stored messages, other members only
    IF p_items @? '$[*].mentions' THEN
        UPDATE chat_messages m
        SET mentions = ARRAY(
                SELECT DISTINCT u
                FROM jsonb_array_elements_text(it.e -> 'mentions') u
                WHERE u <> m.sender
                  AND EXISTS (SELECT 1 FROM chat_members mb
                              WHERE mb.conversation_id = m.conversation_id
                                AND mb.user_id = u)
                ORDER BY u)
        FROM jsonb_array_elements(p_items) WITH ORDINALITY AS it (e, ord)
        JOIN unnest(v_rows) r ON (r).o_idx = it.ord
        WHERE m.id = (r).o_id AND (r).o_status = 'ok'
          AND jsonb_typeof(it.e -> 'mentions') = 'array';

        SELECT array_agg(CASE WHEN m.id IS NULL OR m.mentions = '{}'
                              THEN r
                              ELSE ROW((r).o_idx, (r).o_status, (r).o_conv,
                                       (r).o_id, chat_message_json(m),
                                       chat_message_event(m))::chat_send_row
                         END ORDER BY (r).o_idx)
        INTO v_rows
        FROM unnest(v_rows) r
        LEFT JOIN chat_messages m ON m.id = (r).o_id
                                 AND (r).o_status = 'ok';
    END IF;

    UPDATE chat_members mb
    SET read_seq = greatest(mb.read_seq, y.s),
        delivered_seq = greatest(mb.delivered_seq, y.s)
    FROM (SELECT m.conversation_id AS c, m.sender AS u, max(m.seq) AS s
          FROM chat_messages m
          WHERE m.id IN (SELECT (r).o_id FROM unnest(v_rows) r
                         WHERE (r).o_status = 'ok')
          GROUP BY 1, 2) y
    WHERE mb.conversation_id = y.c AND mb.user_id = y.u
      AND mb.read_seq < y.s;

    RETURN QUERY
    SELECT (r).o_idx, (r).o_status, (r).o_conv, (r).o_id, (r).o_message,
           (r).o_event
    FROM unnest(v_rows) r;
END;
$$;


-- A conversation for one of its members or a service: the conversation
-- object, every member's positions, and the caller's unread count.
CREATE FUNCTION chat_conversation_detail(p_conv bigint, p_user text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT (chat_conversation_json(c.id)::jsonb
            || jsonb_build_object(
                'receipts',
                (SELECT coalesce(jsonb_agg(jsonb_build_object(
                            'user', mb.user_id,
                            'delivered_seq', mb.delivered_seq,
                            'read_seq', mb.read_seq)
                        ORDER BY mb.user_id), '[]')
                 FROM chat_members mb WHERE mb.conversation_id = c.id),
                'unread_count',
                (SELECT chat_unread(c.id, c.last_seq, mb.read_seq)
                 FROM chat_members mb
                 WHERE mb.conversation_id = c.id AND mb.user_id = p_user)
            ))::text
    FROM chat_conversations c WHERE c.id = p_conv
$$;


-- Conversations of a user, as in version 1, with the unread count above.
CREATE OR REPLACE FUNCTION chat_list_conversations(p_user text, p_before_ts bigint,
                                        p_before_id bigint, p_limit int)
RETURNS text
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT c.id, c.last_activity, c.last_seq, mb.read_seq
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
                      WHERE m.conversation_id = r.id
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


-- The platform's notification outbox.  A recipient (not the sender) gets
-- one row per message, exactly once (UNIQUE, and a watermark moved in the
-- same transaction), when the message is still undelivered to them
-- p_delay after it was stored and it is a direct message, mentions them,
-- or replies to their message; a muted conversation notifies mentions
-- only.  The module runs chat_notify_sweep() about once a second with the
-- position below which every event is final (its bus position), so a
-- late commit is never passed over.  Rows stay until the platform
-- acknowledges them, or p_retention.
ALTER TABLE chat_members ADD COLUMN muted boolean NOT NULL DEFAULT false;

CREATE TABLE chat_notifications (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          text NOT NULL,
    conversation_id  bigint NOT NULL,
    message_id       bigint NOT NULL,
    reason           text NOT NULL
                     CHECK (reason IN ('direct', 'mention', 'reply',
                                       'reaction')),
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (user_id, message_id)
);

CREATE TABLE chat_notify_state (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    upto  bigint NOT NULL          -- every event <= upto was looked at
);

INSERT INTO chat_notify_state (id, upto)
SELECT true, coalesce(max(gseq), 0) FROM chat_events;

CREATE FUNCTION chat_notify_sweep(p_upto bigint, p_delay_ms bigint,
                                  p_retention_s bigint)
RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_from   bigint;
    v_to     bigint;
    v_young  bigint;
    v_cut    timestamptz := clock_timestamp() - p_delay_ms * interval '1 ms';
    v_n      int;
BEGIN
    -- one sweeper at a time, whichever worker or nginx asks
    IF NOT pg_try_advisory_xact_lock(7411230907160115) THEN
        RETURN -1;
    END IF;

    SELECT s.upto INTO v_from FROM chat_notify_state s;

    -- a bounded step; the first message still younger than the delay
    -- stops it (it is looked at again next time)
    v_to := least(p_upto, v_from + 100000);

    SELECT min(e.gseq) INTO v_young
    FROM chat_events e JOIN chat_messages m ON m.id = e.message_id
    WHERE e.gseq > v_from AND e.gseq <= v_to AND m.created_at > v_cut;

    IF v_young IS NOT NULL THEN
        v_to := v_young - 1;
    END IF;

    IF v_to <= v_from THEN
        RETURN 0;
    END IF;

    INSERT INTO chat_notifications (user_id, conversation_id, message_id,
                                    reason)
    SELECT mb.user_id, m.conversation_id, m.id, x.reason
    FROM chat_events e
    JOIN chat_messages m ON m.id = e.message_id
    JOIN chat_conversations c ON c.id = m.conversation_id
    JOIN chat_members mb ON mb.conversation_id = m.conversation_id
                        AND mb.user_id <> m.sender
    CROSS JOIN LATERAL (
        SELECT CASE
               WHEN mb.user_id = ANY (m.mentions) THEN 'mention'
               WHEN mb.muted THEN NULL
               WHEN c.kind = 'direct' THEN 'direct'
               WHEN m.reply_to IS NOT NULL
                    AND (SELECT r.sender FROM chat_messages r
                         WHERE r.id = m.reply_to) = mb.user_id
                   THEN 'reply'
               END AS reason) x
    WHERE e.gseq > v_from AND e.gseq <= v_to
      AND x.reason IS NOT NULL
      AND NOT m.deleted
      AND mb.delivered_seq < m.seq
    ORDER BY e.gseq, mb.user_id
    ON CONFLICT (user_id, message_id) DO NOTHING;

    GET DIAGNOSTICS v_n = ROW_COUNT;

    UPDATE chat_notify_state SET upto = v_to;

    DELETE FROM chat_notifications n
    WHERE n.id IN (SELECT o.id FROM chat_notifications o
                   WHERE o.created_at
                         < clock_timestamp() - p_retention_s * interval '1 s'
                   ORDER BY o.id LIMIT 10000);

    RETURN v_n;
END;
$$;


-- a bounded range of events, each joined to its few members by key: a
-- hash of all of chat_members per sweep would cost far more
ALTER FUNCTION chat_notify_sweep(bigint, bigint, bigint)
    SET enable_hashjoin = off;
ALTER FUNCTION chat_notify_sweep(bigint, bigint, bigint)
    SET enable_mergejoin = off;


-- A page of the outbox for the platform, oldest first.
CREATE FUNCTION chat_notifications_page(p_after bigint, p_limit int)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'notifications', coalesce(json_agg(json_build_object(
            'id', p.id::text,
            'user', p.user_id,
            'conversation_id', p.conversation_id::text,
            'reason', p.reason,
            'created_at', chat_ts(p.created_at),
            'message', (SELECT chat_message_json(m)::json FROM chat_messages m
                        WHERE m.id = p.message_id))
            ORDER BY p.id), '[]'),
        'next', max(p.id)::text)::text
    FROM (SELECT * FROM chat_notifications n
          WHERE n.id > p_after ORDER BY n.id LIMIT p_limit) p
$$;


-- Total unread of a user, for GET /me.
CREATE FUNCTION chat_unread_total(p_user text)
RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(chat_unread(c.id, c.last_seq, mb.read_seq)), 0)
    FROM chat_members mb JOIN chat_conversations c
      ON c.id = mb.conversation_id
    WHERE mb.user_id = p_user
$$;


INSERT INTO chat_schema_version (version) VALUES (4);
