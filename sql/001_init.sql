-- ngx_chat_module schema, version 1.
--
-- Delivery rests on one commit-ordered, gapless counter (chat_clock.v):
-- every transaction that writes durable events locks the conversations it
-- touches first, then the clock row, and holds both to commit.  So events
-- commit in gseq order and every gseq value is one committed event; a
-- client cursor is a gseq and can never skip a late commit.

CREATE TABLE IF NOT EXISTS chat_schema_version (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chat_clock (
    id     boolean PRIMARY KEY DEFAULT true CHECK (id),
    v      bigint NOT NULL,
    -- names this event space: a cursor from another database (or one
    -- that was restored from a backup) is recognised as unknown
    epoch  text NOT NULL
);

INSERT INTO chat_clock (id, v, epoch)
VALUES (true, 0, substr(md5(random()::text || clock_timestamp()::text), 1, 8));

CREATE TABLE chat_conversations (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('direct', 'group')),
    title          text,
    context        jsonb,
    direct_key     text UNIQUE,
    last_seq       bigint NOT NULL DEFAULT 0,
    last_activity  timestamptz NOT NULL DEFAULT clock_timestamp(),
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE chat_members (
    conversation_id  bigint NOT NULL REFERENCES chat_conversations (id),
    user_id          text NOT NULL,
    joined_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    delivered_seq    bigint NOT NULL DEFAULT 0,
    read_seq         bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, user_id)
);

CREATE INDEX chat_members_user ON chat_members (user_id, conversation_id);

CREATE TABLE chat_messages (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES chat_conversations (id),
    seq              bigint NOT NULL,
    sender           text NOT NULL,
    client_msg_id    text NOT NULL,
    body             text NOT NULL,
    format           text NOT NULL DEFAULT 'text'
                     CHECK (format IN ('text', 'markdown')),
    reply_to         bigint,
    attachments      jsonb NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    edited_at        timestamptz,
    deleted          boolean NOT NULL DEFAULT false,
    UNIQUE (conversation_id, seq),
    UNIQUE (sender, client_msg_id)
);

-- The durable event log.  payload is the event object exactly as clients
-- receive it; catch-up and the live bus serve the same bytes.
CREATE TABLE chat_events (
    gseq             bigint PRIMARY KEY,
    conversation_id  bigint NOT NULL,
    kind             text NOT NULL,
    payload          text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX chat_events_conversation ON chat_events (conversation_id, gseq);


CREATE FUNCTION chat_ts(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Built by concatenation: compact, and cheaper than json_build_object on
-- the send path.
CREATE FUNCTION chat_message_json(m chat_messages) RETURNS text
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
        || '}'
$$;

CREATE FUNCTION chat_conversation_json(p_id bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', c.id::text,
        'kind', c.kind,
        'title', c.title,
        'context', c.context,
        'members', (SELECT coalesce(json_agg(mb.user_id ORDER BY mb.user_id),
                                    '[]'::json)
                    FROM chat_members mb WHERE mb.conversation_id = c.id),
        'last_seq', c.last_seq,
        'created_at', chat_ts(c.created_at))::text
    FROM chat_conversations c WHERE c.id = p_id
$$;


-- Stores a batch of sends in one transaction, set-based: one statement
-- validates, locks, numbers and inserts them all.  Items (a JSON array) are
-- {sender, conversation_id, client_msg_id, body, format, reply_to,
-- attachments}, already validated by the module, which also never puts
-- the same (sender, client_msg_id) twice into one batch.  Returns one row
-- per item, in item order:
--   ok         stored now: gseq, message, event
--   dup        (sender, client_msg_id) was stored before: message
--   conflict   that client_msg_id was used for another conversation
--   busy       the conversation is locked by someone else: retry later
--   not_found, forbidden, bad_reply_to
-- Conversations are locked with SKIP LOCKED, so a stalled conversation
-- never blocks the batch (and the pool connection) that carries others.
CREATE FUNCTION chat_send_batch(p_items jsonb)
RETURNS TABLE (o_idx int, o_status text, o_gseq bigint, o_conv bigint,
               o_message text, o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_want    int;
    v_got     int;
    v_clk     bigint;
    r_idx     int[];
    r_status  text[];
    r_conv    bigint[];
    r_seq     bigint[];
    r_msg     text[];
    r_gseq    bigint[];
    r_ev      text[];
BEGIN
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
    ), locked AS (
        SELECT c.id, c.last_seq FROM chat_conversations c
        WHERE c.id = ANY (ARRAY(SELECT DISTINCT it.conv FROM items it))
        ORDER BY c.id
        FOR UPDATE SKIP LOCKED
    ), prior AS (
        -- LATERAL: one index probe per item, never a join over the table
        SELECT it.idx, p.m FROM items it
        CROSS JOIN LATERAL (SELECT m FROM chat_messages m
                            WHERE m.sender = it.sender
                              AND m.client_msg_id = it.cmid) p
    ), classified AS (
        -- every check is a LATERAL index probe per item: the planner
        -- would otherwise hash whole tables for an unknown item count
        SELECT it.*, l.last_seq, p.m,
            CASE
            WHEN p.idx IS NOT NULL THEN
                CASE WHEN (p.m).conversation_id = it.conv THEN 'dup'
                     ELSE 'conflict' END
            WHEN l.id IS NULL THEN
                CASE WHEN ex.ok THEN 'busy' ELSE 'not_found' END
            WHEN mem.ok IS NULL THEN 'forbidden'
            WHEN it.reply_to IS NOT NULL AND rt.ok IS NULL
                THEN 'bad_reply_to'
            ELSE 'ok' END AS status
        FROM items it
        LEFT JOIN prior p ON p.idx = it.idx
        LEFT JOIN locked l ON l.id = it.conv
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


-- Creates a conversation with its members and a conversation.created
-- event.  A direct conversation is unique per pair: creating it again
-- returns the existing one with o_created = false and no event.
CREATE FUNCTION chat_create_conversation(p_creator text, p_kind text,
                                         p_members text[], p_title text,
                                         p_context jsonb)
RETURNS TABLE (o_created boolean, o_conv bigint, o_json text, o_gseq bigint,
               o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_members  text[];
    v_key      text;
    v_id       bigint;
    v_clk      bigint;
    v_json     text;
BEGIN
    SELECT array_agg(DISTINCT u ORDER BY u) INTO v_members
    FROM unnest(p_members) u;

    IF p_kind = 'direct' THEN
        v_key := v_members[1] || ' ' || v_members[2];
    END IF;

    INSERT INTO chat_conversations AS c
        (kind, title, context, direct_key, created_by)
    VALUES (p_kind, p_title, p_context, v_key, p_creator)
    ON CONFLICT (direct_key) DO NOTHING
    RETURNING c.id INTO v_id;

    IF NOT FOUND THEN
        SELECT c.id INTO v_id FROM chat_conversations c
        WHERE c.direct_key = v_key;
        RETURN QUERY SELECT false, v_id, chat_conversation_json(v_id),
                            NULL::bigint, NULL::text;
        RETURN;
    END IF;

    INSERT INTO chat_members (conversation_id, user_id)
    SELECT v_id, u FROM unnest(v_members) u;

    v_json := chat_conversation_json(v_id);

    UPDATE chat_clock SET v = v + 1 RETURNING v INTO v_clk;

    INSERT INTO chat_events (gseq, conversation_id, kind, payload)
    VALUES (v_clk, v_id, 'conversation.created',
            '{"kind":"conversation.created","conversation_id":"' || v_id
            || '","conversation":' || v_json || '}');

    RETURN QUERY SELECT true, v_id, v_json, v_clk,
        '{"kind":"conversation.created","conversation_id":"' || v_id
        || '","conversation":' || v_json || '}';
END;
$$;


-- Conversations of a user, most recently active first, keyset paginated
-- on (last_activity, id).  Returns the whole REST answer.
CREATE FUNCTION chat_list_conversations(p_user text, p_before_ts bigint,
                                        p_before_id bigint, p_limit int)
RETURNS text
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT c.id, c.last_activity, mb.read_seq
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
                     (SELECT count(*) FROM chat_messages m
                      WHERE m.conversation_id = r.id
                        AND m.seq > r.read_seq
                        AND m.sender <> p_user)))
                ORDER BY r.rn)
            FROM rows r), '[]'::json),
        'next', (SELECT CASE WHEN count(*) = p_limit THEN
                     (SELECT (extract(epoch FROM r.last_activity)
                              * 1000000)::bigint || ':' || r.id
                      FROM rows r ORDER BY r.rn DESC LIMIT 1)
                 END
                 FROM rows))::text
$$;


-- History of one conversation: NULL when it does not exist, 'forbidden'
-- when the caller may not read it.
-- Newest first by default; with p_after ascending from it.
CREATE FUNCTION chat_history(p_user text, p_service boolean, p_conv bigint,
                             p_before bigint, p_after bigint, p_limit int)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_rows  text;
    v_n     int;
    v_edge  bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM chat_conversations c WHERE c.id = p_conv)
    THEN
        RETURN NULL;
    END IF;

    IF NOT p_service
       AND NOT EXISTS (SELECT 1 FROM chat_members mb
                       WHERE mb.conversation_id = p_conv
                         AND mb.user_id = p_user)
    THEN
        RETURN 'forbidden';
    END IF;

    IF p_after IS NOT NULL THEN
        SELECT string_agg(chat_message_json(m), ',' ORDER BY m.seq),
               count(*), max(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.conversation_id = p_conv AND m.seq > p_after
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq LIMIT p_limit) m;
    ELSE
        SELECT string_agg(chat_message_json(m), ',' ORDER BY m.seq DESC),
               count(*), min(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.conversation_id = p_conv
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq DESC LIMIT p_limit) m;
    END IF;

    RETURN '{"messages":[' || coalesce(v_rows, '') || '],"next":'
           || CASE WHEN v_n = p_limit THEN v_edge::text ELSE 'null' END
           || '}';
END;
$$;

INSERT INTO chat_schema_version (version) VALUES (1);
