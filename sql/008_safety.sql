-- ngx_chat_module schema, version 8: safety (blocks, reports, archived
-- conversations), the service's system messages, and erasing a user.
--
-- Blocks are one-way: chat_blocks (blocker, blocked).  A blocked user
-- cannot open a direct conversation with the blocker nor send in one
-- (status 'blocked'), and the blocker gets no notification of theirs
-- (a trigger on the outbox).  In a group nothing is refused: messages
-- are stored and delivered, and the blocker's client may hide them.
--
-- An archived conversation is read-only: members read it, nobody sends,
-- edits or reacts (a service token may still delete and change members).
--
-- A system message (format 'system') is sent by a service token under
-- its own subject, which need not be a member.
--
-- Attachments: an upload is a row of chat_attachments (its file is named
-- by its id in the module's directory).  A message names uploads of its
-- sender that no other conversation has (the first message binds one to
-- its conversation) and carries their metadata.  Whoever may read a
-- message that names an upload may read the upload; its uploader, until
-- it is sent.  A deleted message's uploads that no other message names,
-- and uploads never sent, are "gone": the module's sweep deletes their
-- rows and then their files.

CREATE TABLE chat_blocks (
    blocker     text NOT NULL,
    blocked     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (blocker, blocked),
    CHECK (blocker <> blocked)
);

ALTER TABLE chat_conversations
    ADD COLUMN archived boolean NOT NULL DEFAULT false;

-- (erasing a user finds their messages by UNIQUE (sender, client_msg_id))
CREATE INDEX chat_blocks_blocked ON chat_blocks (blocked);
CREATE INDEX IF NOT EXISTS chat_reactions_user ON chat_reactions (user_id);


CREATE TABLE chat_attachments (
    id               text PRIMARY KEY,           -- 32 hex digits, the file
    owner            text NOT NULL,
    name             text NOT NULL,
    mime             text NOT NULL,
    size             bigint NOT NULL,
    sha256           text NOT NULL,
    url              text NOT NULL,
    conversation_id  bigint,                     -- bound by its first message
    gone             boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX chat_attachments_unsent ON chat_attachments (created_at)
    WHERE conversation_id IS NULL;
CREATE INDEX chat_attachments_gone ON chat_attachments (id) WHERE gone;
CREATE INDEX chat_attachments_owner ON chat_attachments (owner);

-- the messages that name an upload, found by containment
CREATE INDEX IF NOT EXISTS chat_messages_attachments ON chat_messages
    USING gin (attachments jsonb_path_ops) WHERE attachments <> '[]';

CREATE OR REPLACE FUNCTION chat_conversation_json(p_id bigint) RETURNS text
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
        'created_at', chat_ts(c.created_at),
        'created_by', c.created_by,
        'history', c.history,
        'archived', c.archived)::text
    FROM chat_conversations c WHERE c.id = p_id
$$;


-- The send stage of version 3 with three more answers: 'archived',
-- 'blocked' (a direct conversation whose other member blocks the
-- sender), and a system message that needs no membership.  The blocks
-- are looked up for direct conversations only, by key.
CREATE OR REPLACE FUNCTION chat_send_stage_v3(p_key bigint,
                                              p_holder bigint, p_items jsonb)
RETURNS TABLE (o_idx int, o_status text, o_conv bigint, o_id bigint,
               o_message text, o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_want    int;
    v_got     int;
    v_locked  jsonb;
    r_idx     int[];
    r_status  text[];
    r_conv    bigint[];
    r_id      bigint[];
    r_seq     bigint[];
    r_msg     text[];
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

    -- the conversations of the batch that nobody else holds, as a map
    SELECT coalesce(jsonb_object_agg(l.id, l.last_seq), '{}')
    INTO v_locked
    FROM (SELECT c.id, c.last_seq FROM chat_conversations c
          WHERE c.id = ANY (ARRAY(
                    SELECT DISTINCT (e ->> 'conversation_id')::bigint
                    FROM jsonb_array_elements(p_items) e))
          ORDER BY c.id
          FOR UPDATE SKIP LOCKED) l;

    -- the uploads the batch names, held: a sweep or another send does not
    -- change them under this one
    IF p_items @? '$[*].attachments[*]' THEN
        PERFORM 1 FROM chat_attachments a
        WHERE a.id IN (SELECT jsonb_array_elements_text(e -> 'attachments')
                       FROM jsonb_array_elements(p_items) e)
        ORDER BY a.id
        FOR UPDATE;
    END IF;

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
    ), first_use AS (
        -- an upload not sent yet goes to the first conversation of the
        -- batch that names it
        SELECT DISTINCT ON (x.v) x.v AS id, it.conv
        FROM items it, jsonb_array_elements_text(it.attachments) AS x (v)
        ORDER BY x.v, it.idx
    ), classified AS (
        SELECT it.*, (v_locked ->> it.conv::text)::bigint AS last_seq, p.m,
               att.meta,
            CASE
            WHEN p.found THEN
                CASE WHEN (p.m).conversation_id = it.conv THEN 'dup'
                     ELSE 'conflict' END
            WHEN NOT v_locked ? it.conv::text THEN
                CASE WHEN ex.ok THEN 'busy' ELSE 'not_found' END
            WHEN it.format <> 'system' AND mem.ok IS NULL THEN 'forbidden'
            WHEN ex.archived THEN 'archived'
            WHEN att.bad > 0 THEN 'bad_attachment'
            WHEN it.format = 'system' THEN
                CASE WHEN it.reply_to IS NULL THEN 'ok'
                     ELSE 'bad_reply_to' END
            WHEN blk.ok THEN 'blocked'
            WHEN it.reply_to IS NOT NULL AND rt.ok IS NULL
                THEN 'bad_reply_to'
            ELSE 'ok' END AS status
        FROM items it
        LEFT JOIN LATERAL (SELECT true AS found, m FROM chat_messages m
                           WHERE m.sender = it.sender
                             AND m.client_msg_id = it.cmid LIMIT 1) p ON true
        LEFT JOIN LATERAL (SELECT true AS ok, c.archived, c.kind
                           FROM chat_conversations c
                           WHERE c.id = it.conv LIMIT 1) ex ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_members mb
                           WHERE mb.conversation_id = it.conv
                             AND mb.user_id = it.sender LIMIT 1) mem ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_members o
                           JOIN chat_blocks b ON b.blocker = o.user_id
                                             AND b.blocked = it.sender
                           WHERE ex.kind = 'direct'
                             AND o.conversation_id = it.conv
                             AND o.user_id <> it.sender LIMIT 1) blk ON true
        LEFT JOIN LATERAL (
            SELECT count(*) FILTER (
                       WHERE a.id IS NULL OR a.gone OR a.owner <> it.sender
                          OR a.conversation_id <> it.conv
                          OR (a.conversation_id IS NULL
                              AND EXISTS (SELECT 1 FROM first_use f
                                          WHERE f.id = a.id
                                            AND f.conv <> it.conv))) AS bad,
                   jsonb_agg(jsonb_build_object(
                       'id', a.id, 'name', a.name, 'mime', a.mime,
                       'size', a.size, 'url', a.url) ORDER BY x.ord) AS meta
            FROM jsonb_array_elements_text(it.attachments)
                 WITH ORDINALITY AS x (v, ord)
            -- a probe by key per id, whatever the table's statistics say
            LEFT JOIN LATERAL (SELECT * FROM chat_attachments y
                               WHERE y.id = x.v LIMIT 1) a ON true
            WHERE it.attachments <> '[]') att ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_messages m
                           WHERE m.id = it.reply_to
                             AND m.conversation_id = it.conv LIMIT 1) rt
               ON true
    ), numbered AS (
        SELECT c.idx, c.conv, c.sender, c.cmid, c.body, c.format, c.reply_to,
               coalesce(c.meta, '[]') AS attachments,
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
           array_agg(i.id ORDER BY c.idx),
           array_agg(i.seq ORDER BY c.idx),
           array_agg(CASE c.status
                     WHEN 'ok' THEN chat_message_json(ROW(i.*)::chat_messages)
                     WHEN 'dup' THEN chat_message_json(c.m)
                     END ORDER BY c.idx),
           count(*) FILTER (WHERE c.status = 'ok'),
           count(i.id)
    INTO r_idx, r_status, r_conv, r_id, r_seq, r_msg, v_want, v_got
    FROM classified c
    LEFT JOIN ins i
      ON c.status = 'ok' AND i.sender = c.sender AND i.client_msg_id = c.cmid;

    -- the uploads of the stored messages belong to their conversations
    IF p_items @? '$[*].attachments[*]' THEN
        UPDATE chat_attachments a SET conversation_id = m.conversation_id
        FROM chat_messages m, jsonb_array_elements(m.attachments) e
        WHERE m.id = ANY (r_id) AND m.attachments <> '[]'
          AND a.id = e ->> 'id' AND a.conversation_id IS NULL;
    END IF;

    IF v_got <> v_want THEN
        -- another conversation's transaction stored the same
        -- client_msg_id first: its seq is taken, so the module runs the
        -- batch again (seq stays gapless)
        RAISE EXCEPTION 'chat: concurrent duplicate client_msg_id'
              USING ERRCODE = '40001';
    END IF;

    RETURN QUERY
    SELECT u.idx, u.status, u.conv, u.id, u.msg,
           CASE WHEN u.status = 'ok' THEN
               chat_message_event_json(u.conv, u.seq, u.msg)
           END
    FROM unnest(r_idx, r_status, r_conv, r_id, r_seq, r_msg)
         AS u (idx, status, conv, id, seq, msg);
END;
$$;

-- A send is a short statement: never worth compiling (the planner's
-- guesses for the laterals above, 100 rows of each jsonb array, put its
-- cost past jit_above_cost, and compiling took ~0.9 s per batch).
ALTER FUNCTION chat_send_stage_v3(bigint, bigint, jsonb) SET jit = off;
ALTER FUNCTION chat_send_stage(bigint, bigint, jsonb) SET jit = off;


-- Creating a conversation: a direct one with a user who blocks the
-- creator is refused (o_conv NULL), whether it exists already or not.
ALTER FUNCTION chat_create_stage(bigint, bigint, text, text, text[], text,
                                 jsonb)
    RENAME TO chat_create_stage_v7;

CREATE FUNCTION chat_create_stage(p_key bigint, p_holder bigint,
                                  p_creator text, p_kind text,
                                  p_members text[], p_title text,
                                  p_context jsonb)
RETURNS TABLE (o_created boolean, o_conv bigint, o_json text, o_event text)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'direct'
       AND EXISTS (SELECT 1 FROM chat_blocks b
                   WHERE b.blocked = p_creator
                     AND b.blocker = ANY (p_members)
                     AND b.blocker <> p_creator)
    THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;

    RETURN QUERY SELECT * FROM chat_create_stage_v7(p_key, p_holder,
        p_creator, p_kind, p_members, p_title, p_context);
END;
$$;


-- The blocker's outbox never gets a row for a message of a user it blocks.
CREATE FUNCTION chat_notify_unblocked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM chat_messages m
               JOIN chat_blocks b ON b.blocker = NEW.user_id
                                 AND b.blocked = m.sender
               WHERE m.id = NEW.message_id)
    THEN
        RETURN NULL;
    END IF;

    RETURN NEW;
END;
$$;

CREATE TRIGGER chat_notifications_unblocked
    BEFORE INSERT ON chat_notifications
    FOR EACH ROW EXECUTE FUNCTION chat_notify_unblocked();


-- Operations as in version 6, except that an archived conversation takes
-- none from a user but a delete or leaving, a blocked user neither edits
-- nor reacts in the direct conversation with the blocker, and a service
-- token archives and unarchives (update_conversation with "archived").
CREATE OR REPLACE FUNCTION chat_op_stage(p_key bigint, p_holder bigint,
                                         p_op text, p_user text,
                                         p_service boolean, p_args jsonb)
RETURNS SETOF chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    v_conv  bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

    -- a row another operation holds for long is not waited for: the
    -- caller is told to retry, and the pool connection is free again
    PERFORM set_config('lock_timeout', '2s', true);

    v_conv := coalesce((p_args ->> 'conversation_id')::bigint,
                       (SELECT m.conversation_id FROM chat_messages m
                        WHERE m.id = (p_args ->> 'message_id')::bigint));

    IF p_args ? 'archived' THEN
        IF NOT p_service THEN
            RETURN NEXT chat_op_err('forbidden', 403, 'only a service token '
                                    || 'archives a conversation');
            RETURN;
        END IF;

        UPDATE chat_conversations c
        SET archived = (p_args ->> 'archived')::boolean
        WHERE c.id = v_conv;

    ELSIF NOT p_service AND p_op NOT IN ('delete', 'remove_member')
          AND (SELECT c.archived FROM chat_conversations c
               WHERE c.id = v_conv)
    THEN
        -- a member may still delete its messages and leave
        RETURN NEXT chat_op_err('archived', 403,
                                'the conversation is archived (read-only)');
        RETURN;
    END IF;

    -- in a direct conversation, a blocked user changes nothing either
    IF NOT p_service AND p_op IN ('edit', 'react')
       AND EXISTS (SELECT 1 FROM chat_conversations c
                   JOIN chat_members o ON o.conversation_id = c.id
                   JOIN chat_blocks b ON b.blocker = o.user_id
                                     AND b.blocked = p_user
                   WHERE c.id = v_conv AND c.kind = 'direct'
                     AND o.user_id <> p_user)
    THEN
        RETURN NEXT chat_op_err('blocked', 403, 'the other member does not '
                                || 'take messages from this user');
        RETURN;
    END IF;

    RETURN NEXT CASE p_op
        WHEN 'edit' THEN chat_op_edit(p_user, p_service, p_args)
        WHEN 'delete' THEN chat_op_delete(p_user, p_service, p_args)
        WHEN 'react' THEN chat_op_react(p_user, p_service, p_args, true)
        WHEN 'unreact' THEN chat_op_react(p_user, p_service, p_args, false)
        WHEN 'add_members' THEN chat_op_members(p_user, p_service, p_args,
                                                true)
        WHEN 'remove_member' THEN chat_op_members(p_user, p_service, p_args,
                                                  false)
        WHEN 'update_conversation' THEN chat_op_update(p_user, p_service,
                                                       p_args)
        ELSE chat_op_err('bad_request', 400, 'unknown operation')
        END;
END;
$$;


-- Requests that make no event (blocks, reports, erasing) go through one
-- statement: chat_call() answers an HTTP status and a JSON body, an
-- error as {"error":{"code","message"}}.
CREATE TYPE chat_call_row AS (o_http int, o_body text);

CREATE FUNCTION chat_call_err(p_http int, p_code text, p_message text)
RETURNS chat_call_row
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_http, json_build_object('error', json_build_object(
                'code', p_code, 'message', p_message))::text)::chat_call_row
$$;


CREATE FUNCTION chat_blocks_json(p_user text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object('blocks', coalesce(json_agg(json_build_object(
               'user', b.blocked, 'created_at', chat_ts(b.created_at))
               ORDER BY b.created_at, b.blocked), '[]'::json))::text
    FROM chat_blocks b WHERE b.blocker = p_user
$$;


CREATE TABLE chat_reports (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reporter         text NOT NULL,
    message_id       bigint NOT NULL,
    conversation_id  bigint NOT NULL,
    sender           text NOT NULL,
    reason           text NOT NULL
                     CHECK (reason IN ('spam', 'harassment', 'scam',
                                       'inappropriate', 'other')),
    note             text NOT NULL DEFAULT '',
    -- the message and up to 3 on each side as they were: kept when the
    -- sender deletes them later
    snapshot         jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'open'
                     CHECK (status IN ('open', 'resolved', 'dismissed')),
    resolution       text,
    resolved_by      text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    resolved_at      timestamptz,
    UNIQUE (reporter, message_id)
);

CREATE INDEX chat_reports_status ON chat_reports (status, id);
CREATE INDEX chat_reports_sender ON chat_reports (sender);


CREATE FUNCTION chat_report_json(x chat_reports) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', x.id::text,
        'reporter', x.reporter,
        'message_id', x.message_id::text,
        'conversation_id', x.conversation_id::text,
        'sender', x.sender,
        'reason', x.reason,
        'note', x.note,
        'snapshot', x.snapshot,
        'status', x.status,
        'resolution', x.resolution,
        'resolved_by', x.resolved_by,
        'created_at', chat_ts(x.created_at),
        'resolved_at', chat_ts(x.resolved_at))::text
$$;


CREATE FUNCTION chat_call_report(p_user text, a jsonb)
RETURNS chat_call_row
LANGUAGE plpgsql AS $$
DECLARE
    m      chat_messages;
    v_from bigint := 0;
    x      chat_reports;
BEGIN
    -- held: an erase or a delete of it waits for the snapshot, or goes first
    SELECT * INTO m FROM chat_messages y
    WHERE y.id = (a ->> 'message_id')::bigint
    FOR SHARE;

    IF NOT FOUND OR NOT chat_is_member(m.conversation_id, p_user) THEN
        RETURN chat_call_err(404, 'not_found', 'no such message');
    END IF;

    -- a 'since_join' member sees, and so reports, from its join on
    SELECT CASE WHEN c.history = 'since_join' THEN mb.joined_seq ELSE 0 END
    INTO v_from
    FROM chat_conversations c
    JOIN chat_members mb ON mb.conversation_id = c.id AND mb.user_id = p_user
    WHERE c.id = m.conversation_id;

    IF m.seq <= v_from THEN
        RETURN chat_call_err(404, 'not_found', 'no such message');
    END IF;

    INSERT INTO chat_reports AS r (reporter, message_id, conversation_id,
                                   sender, reason, note, snapshot)
    VALUES (p_user, m.id, m.conversation_id, m.sender, a ->> 'reason',
            coalesce(a ->> 'note', ''),
            jsonb_build_object(
                'message', chat_message_json(m)::jsonb,
                'context', (SELECT coalesce(jsonb_agg(chat_message_json(y)::jsonb
                                                      ORDER BY y.seq), '[]')
                            FROM ((SELECT * FROM chat_messages z
                                   WHERE z.conversation_id = m.conversation_id
                                     AND z.seq < m.seq AND z.seq > v_from
                                   ORDER BY z.seq DESC LIMIT 3)
                                  UNION ALL
                                  (SELECT * FROM chat_messages z
                                   WHERE z.conversation_id = m.conversation_id
                                     AND z.seq > m.seq
                                   ORDER BY z.seq LIMIT 3)) y)))
    ON CONFLICT (reporter, message_id) DO NOTHING
    RETURNING * INTO x;

    IF NOT FOUND THEN
        -- reported before: the same report, by its id and status only (not
        -- its snapshot, which may hold text deleted since, nor the
        -- moderator's resolution)
        SELECT * INTO x FROM chat_reports r
        WHERE r.reporter = p_user AND r.message_id = m.id;

        RETURN (200, json_build_object('report', json_build_object(
                    'id', x.id::text, 'message_id', x.message_id::text,
                    'status', x.status,
                    'created_at', chat_ts(x.created_at)))::text
               )::chat_call_row;
    END IF;

    RETURN (201, '{"report":' || chat_report_json(x) || '}')::chat_call_row;
END;
$$;


CREATE FUNCTION chat_call_reports(a jsonb)
RETURNS chat_call_row
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT * FROM chat_reports r
        WHERE (NOT a ? 'status' OR r.status = a ->> 'status')
          AND r.id > coalesce((a ->> 'after')::bigint, 0)
        ORDER BY r.id
        LIMIT (a ->> 'limit')::int
    )
    SELECT (200, '{"reports":['
                 || coalesce((SELECT string_agg(chat_report_json(p), ','
                                                ORDER BY p.id) FROM page p), '')
                 || '],"next":'
                 || coalesce((SELECT '"' || max(p.id) || '"' FROM page p
                              HAVING count(*) = (a ->> 'limit')::int),
                             'null')
                 || '}')::chat_call_row
$$;


CREATE FUNCTION chat_call_resolve(p_user text, a jsonb)
RETURNS chat_call_row
LANGUAGE plpgsql AS $$
DECLARE
    x  chat_reports;
BEGIN
    UPDATE chat_reports r
    SET status = a ->> 'status',
        resolution = CASE WHEN a ? 'resolution' THEN a ->> 'resolution'
                          ELSE r.resolution END,
        resolved_by = CASE WHEN a ->> 'status' = 'open' THEN NULL
                           ELSE p_user END,
        resolved_at = CASE WHEN a ->> 'status' = 'open' THEN NULL
                           ELSE clock_timestamp() END
    WHERE r.id = (a ->> 'report_id')::bigint
    RETURNING * INTO x;

    IF NOT FOUND THEN
        RETURN chat_call_err(404, 'not_found', 'no such report');
    END IF;

    RETURN (200, '{"report":' || chat_report_json(x) || '}')::chat_call_row;
END;
$$;


-- A message object (or null) with the body emptied when p_user sent it.
CREATE FUNCTION chat_redact(p_m jsonb, p_user text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_m ->> 'sender' = p_user
                THEN p_m || '{"body":"","attachments":[],"deleted":true}'
                ELSE p_m END
$$;


-- The platform's account deletion: every body the user wrote becomes a
-- tombstone (with its edits, and in report snapshots), their uploads go
-- to the sweep, their reactions,
-- blocks, presence and outbox rows go, and they leave every
-- conversation.  Live clients are not told (no event); history and
-- search read the tombstones from now on.
CREATE FUNCTION chat_call_erase(a jsonb)
RETURNS chat_call_row
LANGUAGE plpgsql AS $$
DECLARE
    v_user   text := a ->> 'user';
    v_msgs   bigint;
    v_convs  bigint;
    v_reacts bigint;
BEGIN
    -- the user's conversations, held as a send holds one: a send of the
    -- user that is in flight commits first (and is erased below), one
    -- that comes later finds the user no longer a member
    PERFORM 1 FROM chat_conversations c
    WHERE c.id IN (SELECT mb.conversation_id FROM chat_members mb
                   WHERE mb.user_id = v_user)
    ORDER BY c.id
    FOR UPDATE;

    DELETE FROM chat_member_spans s WHERE s.user_id = v_user;
    DELETE FROM chat_members mb WHERE mb.user_id = v_user;

    GET DIAGNOSTICS v_convs = ROW_COUNT;

    DELETE FROM chat_message_edits e
    USING chat_messages m
    WHERE e.message_id = m.id AND m.sender = v_user;

    DELETE FROM chat_notifications n
    WHERE n.user_id = v_user
       OR n.message_id IN (SELECT m.id FROM chat_messages m
                           WHERE m.sender = v_user);

    UPDATE chat_messages m
    SET body = '', attachments = '[]', mentions = '{}', deleted = true
    WHERE m.sender = v_user AND (NOT m.deleted OR m.body <> '');

    GET DIAGNOSTICS v_msgs = ROW_COUNT;

    UPDATE chat_attachments a SET gone = true
    WHERE a.owner = v_user AND NOT a.gone;

    DELETE FROM chat_reactions r WHERE r.user_id = v_user;

    GET DIAGNOSTICS v_reacts = ROW_COUNT;

    UPDATE chat_reports r
    SET snapshot = jsonb_build_object(
            'message', chat_redact(r.snapshot -> 'message', v_user),
            'context', (SELECT coalesce(jsonb_agg(chat_redact(c.v, v_user)
                                                  ORDER BY c.ord), '[]')
                        FROM jsonb_array_elements(r.snapshot -> 'context')
                             WITH ORDINALITY AS c (v, ord)))
    WHERE r.sender = v_user
       OR jsonb_path_exists(r.snapshot, '$.context[*] ? (@.sender == $u)',
                            jsonb_build_object('u', v_user));

    UPDATE chat_reports r SET note = '' WHERE r.reporter = v_user;

    -- (others' blocks of the user are theirs, and stay)
    DELETE FROM chat_blocks b WHERE b.blocker = v_user;
    DELETE FROM chat_presence p WHERE p.user_id = v_user;

    RETURN (200, json_build_object('erased', json_build_object(
                'user', v_user, 'messages', v_msgs,
                'conversations', v_convs, 'reactions', v_reacts))::text
           )::chat_call_row;
END;
$$;


CREATE FUNCTION chat_call(p_fn text, p_user text, p_service boolean,
                          p_args jsonb)
RETURNS SETOF chat_call_row
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', '2s', true);

    IF p_fn IN ('reports', 'resolve', 'erase') AND NOT p_service THEN
        RETURN NEXT chat_call_err(403, 'forbidden',
                                  'this is for a service token');
        RETURN;
    END IF;

    CASE p_fn
    WHEN 'block' THEN
        IF (SELECT count(*) FROM chat_blocks b WHERE b.blocker = p_user)
           >= 256
           AND NOT EXISTS (SELECT 1 FROM chat_blocks b
                           WHERE b.blocker = p_user
                             AND b.blocked = p_args ->> 'user')
        THEN
            RETURN NEXT chat_call_err(409, 'limit',
                                      'at most 256 users are blocked');
            RETURN;
        END IF;

        INSERT INTO chat_blocks (blocker, blocked)
        VALUES (p_user, p_args ->> 'user')
        ON CONFLICT DO NOTHING;
        RETURN NEXT (200, chat_blocks_json(p_user))::chat_call_row;
    WHEN 'unblock' THEN
        DELETE FROM chat_blocks b
        WHERE b.blocker = p_user AND b.blocked = p_args ->> 'user';
        RETURN NEXT (200, chat_blocks_json(p_user))::chat_call_row;
    WHEN 'blocks' THEN
        RETURN NEXT (200, chat_blocks_json(p_user))::chat_call_row;
    WHEN 'report' THEN
        RETURN NEXT chat_call_report(p_user, p_args);
    WHEN 'reports' THEN
        RETURN NEXT chat_call_reports(p_args);
    WHEN 'resolve' THEN
        RETURN NEXT chat_call_resolve(p_user, p_args);
    WHEN 'erase' THEN
        RETURN NEXT chat_call_erase(p_args);
    ELSE
        RETURN NEXT chat_call_err(400, 'bad_request', 'unknown call');
    END CASE;
END;
$$;


-- A deleted message lets go of its uploads: those no other message still
-- names are gone.
CREATE FUNCTION chat_attachments_release() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- held first: a send naming one of them commits before the next
    -- statement looks (with a snapshot of its own) for the messages
    PERFORM 1 FROM chat_attachments a
    WHERE a.id IN (SELECT x ->> 'id'
                   FROM jsonb_array_elements(OLD.attachments) x)
    ORDER BY a.id
    FOR UPDATE;

    UPDATE chat_attachments a SET gone = true
    WHERE a.id IN (SELECT x ->> 'id'
                   FROM jsonb_array_elements(OLD.attachments) x)
      AND NOT a.gone
      AND NOT EXISTS (SELECT 1 FROM chat_messages m
                      WHERE m.conversation_id = a.conversation_id
                        AND m.attachments <> '[]'
                        AND m.attachments @> jsonb_build_array(
                                jsonb_build_object('id', a.id))
                        AND NOT m.deleted AND m.id <> OLD.id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER chat_messages_release
    AFTER UPDATE OF deleted ON chat_messages
    FOR EACH ROW
    WHEN (NEW.deleted AND NOT OLD.deleted AND OLD.attachments <> '[]')
    EXECUTE FUNCTION chat_attachments_release();


CREATE FUNCTION chat_attachment_json(a chat_attachments) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object('id', a.id, 'name', a.name, 'mime', a.mime,
                             'size', a.size, 'url', a.url,
                             'sha256', a.sha256)::text
$$;


-- A stored upload (its file is in place): the object the uploader gets.
CREATE FUNCTION chat_attachment_add(p_id text, p_owner text, p_name text,
                                    p_mime text, p_size bigint, p_sha text,
                                    p_url text)
RETURNS text
LANGUAGE sql AS $$
    INSERT INTO chat_attachments AS a (id, owner, name, mime, size, sha256,
                                       url)
    VALUES (p_id, p_owner, p_name, p_mime, p_size, p_sha, p_url)
    RETURNING '{"attachment":' || chat_attachment_json(a) || '}'
$$;


-- May p_user read upload p_id?  (o_http, o_name, o_mime): 200 for its
-- uploader until it is sent, a service token, or a member that may read
-- a message naming it (since_join: one after its join); 404 otherwise,
-- so that nobody learns which ids exist.
CREATE FUNCTION chat_attachment_get(p_user text, p_service boolean,
                                    p_id text)
RETURNS TABLE (o_http int, o_name text, o_mime text)
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN a.id IS NOT NULL AND NOT a.gone AND (
                    p_service
                    OR (a.conversation_id IS NULL AND a.owner = p_user)
                    OR EXISTS (
                        SELECT 1
                        FROM chat_members mb
                        JOIN chat_conversations c ON c.id = mb.conversation_id
                        JOIN chat_messages m
                          ON m.conversation_id = mb.conversation_id
                         AND m.attachments <> '[]'
                         AND m.attachments @> jsonb_build_array(
                                 jsonb_build_object('id', a.id))
                         AND NOT m.deleted
                        WHERE mb.conversation_id = a.conversation_id
                          AND mb.user_id = p_user
                          AND (c.history = 'all' OR m.seq > mb.joined_seq)))
                THEN 200 ELSE 404 END,
           a.name, a.mime
    FROM (SELECT 1) one
    LEFT JOIN chat_attachments a ON a.id = p_id
$$;


-- The sweep: up to p_limit uploads that are gone, or were never sent in
-- p_unsent_s seconds, lose their rows; the module then removes their
-- files (a file whose row is gone is never served).
CREATE FUNCTION chat_attachments_sweep(p_unsent_s bigint, p_limit int)
RETURNS SETOF text
LANGUAGE sql AS $$
    DELETE FROM chat_attachments a
    WHERE a.id IN (
        (SELECT g.id FROM chat_attachments g WHERE g.gone
         LIMIT p_limit)
        UNION
        (SELECT u.id FROM chat_attachments u
         WHERE u.conversation_id IS NULL
           AND u.created_at < clock_timestamp()
                              - p_unsent_s * interval '1 s'
         ORDER BY u.created_at
         LIMIT p_limit))
      -- checked again on the row a concurrent send may have just bound
      AND (a.gone
           OR (a.conversation_id IS NULL
               AND a.created_at < clock_timestamp()
                                  - p_unsent_s * interval '1 s'))
    RETURNING a.id
$$;


-- The page of a conversation without JavaScript: the conversation and a
-- page of its history, as the member reads them; 'forbidden' or NULL as
-- chat_history() says.
CREATE FUNCTION chat_page(p_user text, p_conv bigint, p_before bigint,
                          p_limit int)
RETURNS text
LANGUAGE sql AS $$
    SELECT CASE WHEN x.h = 'forbidden' THEN x.h
                ELSE '{"conversation":' || chat_conversation_json(p_conv)
                     || ',"history":' || x.h || '}' END
    FROM (SELECT chat_history(p_user, false, p_conv, p_before, NULL,
                              p_limit) AS h) x
$$;


-- The wider format check comes last: its ACCESS EXCLUSIVE lock is then
-- held only to the commit.  NOT VALID: the old rows cannot be 'system'
-- and are not read again (VALIDATE it later, outside this migration, if
-- you want it marked valid).
ALTER TABLE chat_messages DROP CONSTRAINT chat_messages_format_check;
ALTER TABLE chat_messages ADD CONSTRAINT chat_messages_format_check
    CHECK (format IN ('text', 'markdown', 'system')) NOT VALID;


INSERT INTO chat_schema_version (version) VALUES (8);
