-- ngx_chat_module schema, version 5: editing, deleting and reacting to
-- messages.
--
-- Each of these is one durable event, written like a conversation's
-- creation (003): step 1, chat_op_stage(), locks the message row, checks
-- and writes everything but the event, and says which event it makes;
-- the module reserves one position; step 2, chat_op_event(), inserts the
-- event there, and the module commits.  Two operations on one message
-- wait for each other on the row lock, so their events come in the order
-- of their effects.
--
-- message.edited and message.deleted events hold no text of their own:
-- like message.new they name their message (target_id) and are built from
-- its row when read (chat_event_payload()).  A deleted message's body, edit
-- history, reactions and outbox rows are removed from the database; its
-- row stays, as a tombstone, so that seq has no gap, and every event of it
-- read later shows the tombstone.

-- the versions an edit replaced, for moderation (never served to members)
CREATE TABLE chat_message_edits (
    message_id       bigint NOT NULL REFERENCES chat_messages (id),
    body             text NOT NULL,
    written_at       timestamptz NOT NULL,       -- when that text was set
    replaced_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX chat_message_edits_message ON chat_message_edits (message_id);

CREATE TABLE chat_reactions (
    message_id       bigint NOT NULL REFERENCES chat_messages (id),
    user_id          text NOT NULL,
    emoji            text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (message_id, emoji, user_id)
);

CREATE INDEX chat_reactions_user ON chat_reactions (message_id, user_id);


-- An event object around a message object, of any message kind.
CREATE FUNCTION chat_message_event_kind(p_kind text, m chat_messages)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"kind":"' || p_kind || '","conversation_id":"'
        || m.conversation_id || '","seq":' || m.seq || ',"message":'
        || chat_message_json(m) || '}'
$$;


-- message.edited and message.deleted events name their message in a
-- column of their own: what reads message_id (the outbox sweep, the read
-- cut) looks at message.new only.
ALTER TABLE chat_events ADD COLUMN target_id bigint;

-- message.new events are the first branch, as before
CREATE OR REPLACE FUNCTION chat_event_payload(e chat_events) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(e.payload,
                    (SELECT chat_message_event(m) FROM chat_messages m
                     WHERE m.id = e.message_id),
                    (SELECT chat_message_event_kind(e.kind, m)
                     FROM chat_messages m
                     WHERE m.id = e.target_id))
$$;


-- [{"emoji","count","me"}] of a message, first reacted first; "me" is
-- whether p_viewer is among them.
CREATE FUNCTION chat_reactions_json(p_message bigint, p_viewer text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce('[' || string_agg(
               '{"emoji":' || to_json(r.emoji)::text || ',"count":' || r.n
               || ',"me":' || r.me || '}', ',' ORDER BY r.first) || ']',
           '[]')
    FROM (SELECT x.emoji, count(*) AS n, bool_or(x.user_id = p_viewer) AS me,
                 min(x.created_at) AS first
          FROM chat_reactions x
          WHERE x.message_id = p_message
          GROUP BY x.emoji) r
$$;


-- A message object as one viewer sees it: with the reactions.
CREATE FUNCTION chat_message_json_for(m chat_messages, p_viewer text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT left(chat_message_json(m), -1) || ',"reactions":'
        || chat_reactions_json(m.id, p_viewer) || '}'
$$;


CREATE OR REPLACE FUNCTION chat_history(p_user text, p_service boolean,
                                        p_conv bigint, p_before bigint,
                                        p_after bigint, p_limit int)
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
        SELECT string_agg(chat_message_json_for(m, p_user), ','
                          ORDER BY m.seq),
               count(*), max(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.conversation_id = p_conv AND m.seq > p_after
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq LIMIT p_limit) m;
    ELSE
        SELECT string_agg(chat_message_json_for(m, p_user), ','
                          ORDER BY m.seq DESC),
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


-- What step 1 answers.  o_status: 'ok' (o_event is the event to insert
-- and publish), 'done' (nothing to write: answered with o_result), or an
-- error code with o_http and o_message.
CREATE TYPE chat_op_row AS (o_status text, o_http int, o_message text,
                            o_conv bigint, o_result text, o_event text);


-- The event step 2 inserts, kept in the transaction: its kind, the
-- message it is built from, or its own payload.
CREATE FUNCTION chat_op_keep(p_kind text, p_message bigint, p_payload text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('chat.op_kind', p_kind, true),
            set_config('chat.op_message', coalesce(p_message::text, ''), true),
            set_config('chat.op_payload', coalesce(p_payload, ''), true);
END;
$$;


CREATE FUNCTION chat_op_err(p_code text, p_http int, p_message text)
RETURNS chat_op_row
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_code, p_http, p_message, NULL, NULL, NULL)::chat_op_row
$$;


CREATE FUNCTION chat_op_res(p_status text, p_http int, p_conv bigint,
                            p_result text, p_event text)
RETURNS chat_op_row
LANGUAGE sql IMMUTABLE AS $$
    SELECT (p_status, p_http, NULL, p_conv, p_result, p_event)::chat_op_row
$$;


CREATE FUNCTION chat_is_member(p_conv bigint, p_user text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM chat_members mb
                   WHERE mb.conversation_id = p_conv AND mb.user_id = p_user)
$$;


CREATE FUNCTION chat_op_edit(p_user text, p_service boolean, a jsonb)
RETURNS chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    m       chat_messages;
    v_body  text := a ->> 'body';
    v_win   bigint := coalesce((a ->> 'window_ms')::bigint, 0);
BEGIN
    SELECT * INTO m FROM chat_messages x
    WHERE x.id = (a ->> 'message_id')::bigint
    FOR UPDATE;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'no such message');
    END IF;

    IF NOT p_service AND NOT chat_is_member(m.conversation_id, p_user) THEN
        RETURN chat_op_err('forbidden', 403,
                           'not a member of the conversation');
    END IF;

    IF m.sender <> p_user THEN
        RETURN chat_op_err('forbidden', 403,
                           'only the sender edits a message');
    END IF;

    IF m.deleted THEN
        RETURN chat_op_err('conflict', 409, 'the message was deleted');
    END IF;

    IF v_win > 0
       AND m.created_at < clock_timestamp() - v_win * interval '1 ms'
    THEN
        RETURN chat_op_err('forbidden', 403,
                           'the time to edit this message has passed');
    END IF;

    IF m.body = v_body THEN
        RETURN chat_op_res('done', 200, m.conversation_id,
                '{"message":' || chat_message_json(m) || '}', NULL);
    END IF;

    INSERT INTO chat_message_edits (message_id, body, written_at)
    VALUES (m.id, m.body, coalesce(m.edited_at, m.created_at));

    UPDATE chat_messages x SET body = v_body, edited_at = clock_timestamp()
    WHERE x.id = m.id
    RETURNING * INTO m;

    PERFORM chat_op_keep('message.edited', m.id, NULL);

    RETURN chat_op_res('ok', 200, m.conversation_id,
            '{"message":' || chat_message_json(m) || '}',
            chat_message_event_kind('message.edited', m));
END;
$$;


CREATE FUNCTION chat_op_delete(p_user text, p_service boolean, a jsonb)
RETURNS chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    m      chat_messages;
BEGIN
    SELECT * INTO m FROM chat_messages x
    WHERE x.id = (a ->> 'message_id')::bigint
    FOR UPDATE;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'no such message');
    END IF;

    IF NOT p_service AND NOT chat_is_member(m.conversation_id, p_user) THEN
        RETURN chat_op_err('forbidden', 403,
                           'not a member of the conversation');
    END IF;

    IF NOT p_service AND m.sender <> p_user THEN
        RETURN chat_op_err('forbidden', 403, 'only the sender or a service '
                           || 'token deletes a message');
    END IF;

    IF m.deleted THEN
        RETURN chat_op_res('done', 200, m.conversation_id,
                '{"message":' || chat_message_json(m) || '}', NULL);
    END IF;

    DELETE FROM chat_message_edits x WHERE x.message_id = m.id;
    DELETE FROM chat_reactions x WHERE x.message_id = m.id;
    DELETE FROM chat_notifications x WHERE x.message_id = m.id;

    UPDATE chat_messages x
    SET body = '', attachments = '[]', mentions = '{}', deleted = true
    WHERE x.id = m.id
    RETURNING * INTO m;

    PERFORM chat_op_keep('message.deleted', m.id, NULL);

    RETURN chat_op_res('ok', 200, m.conversation_id,
            '{"message":' || chat_message_json(m) || '}',
            chat_message_event_kind('message.deleted', m));
END;
$$;


-- react / unreact: a user's reactions on a message are at most p_max
-- distinct emoji; the module checks the emoji itself.
CREATE FUNCTION chat_op_react(p_user text, p_service boolean, a jsonb,
                              p_add boolean)
RETURNS chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    m        chat_messages;
    v_emoji  text := a ->> 'emoji';
    v_kind   text;
    v_event  text;
    v_res    text;
    v_n      int;
BEGIN
    IF p_service THEN
        RETURN chat_op_err('forbidden', 403, 'reactions are made by users');
    END IF;

    SELECT * INTO m FROM chat_messages x
    WHERE x.id = (a ->> 'message_id')::bigint
    FOR UPDATE;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'no such message');
    END IF;

    IF NOT p_service AND NOT chat_is_member(m.conversation_id, p_user) THEN
        RETURN chat_op_err('forbidden', 403,
                           'not a member of the conversation');
    END IF;

    IF m.deleted THEN
        RETURN chat_op_err('conflict', 409, 'the message was deleted');
    END IF;

    IF p_add THEN
        IF (SELECT count(*) FROM chat_reactions x
            WHERE x.message_id = m.id AND x.user_id = p_user)
           >= coalesce((a ->> 'max')::int, 20)
           AND NOT EXISTS (SELECT 1 FROM chat_reactions x
                           WHERE x.message_id = m.id AND x.user_id = p_user
                             AND x.emoji = v_emoji)
        THEN
            RETURN chat_op_err('conflict', 409, 'too many reactions of one '
                               || 'user on this message');
        END IF;

        INSERT INTO chat_reactions (message_id, user_id, emoji)
        VALUES (m.id, p_user, v_emoji)
        ON CONFLICT DO NOTHING;

        v_kind := 'reaction.added';

    ELSE
        DELETE FROM chat_reactions x
        WHERE x.message_id = m.id AND x.user_id = p_user
          AND x.emoji = v_emoji;

        v_kind := 'reaction.removed';
    END IF;

    GET DIAGNOSTICS v_n = ROW_COUNT;

    v_res := '{"message_id":"' || m.id || '","reactions":'
             || chat_reactions_json(m.id, p_user) || '}';

    IF v_n = 0 THEN
        RETURN chat_op_res('done', 200, m.conversation_id, v_res, NULL);
    END IF;

    v_event := '{"kind":"' || v_kind || '","conversation_id":"'
               || m.conversation_id || '","message_id":"' || m.id
               || '","seq":' || m.seq || ',"user":' || to_json(p_user)::text
               || ',"emoji":' || to_json(v_emoji)::text || '}';

    PERFORM chat_op_keep(v_kind, NULL, v_event);

    RETURN chat_op_res('ok', CASE WHEN p_add THEN 201 ELSE 200 END,
            m.conversation_id, v_res, v_event);
END;
$$;


-- Step 1 of an operation (the module opened the transaction).
CREATE FUNCTION chat_op_stage(p_key bigint, p_holder bigint, p_op text,
                              p_user text, p_service boolean, p_args jsonb)
RETURNS SETOF chat_op_row
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

    RETURN NEXT CASE p_op
        WHEN 'edit' THEN chat_op_edit(p_user, p_service, p_args)
        WHEN 'delete' THEN chat_op_delete(p_user, p_service, p_args)
        WHEN 'react' THEN chat_op_react(p_user, p_service, p_args, true)
        WHEN 'unreact' THEN chat_op_react(p_user, p_service, p_args, false)
        ELSE chat_op_err('bad_request', 400, 'unknown operation')
        END;
END;
$$;


-- Step 2: the event step 1 kept, at p_gseq.
CREATE FUNCTION chat_op_event(p_gseq bigint, p_conv bigint)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO chat_events (gseq, conversation_id, kind, target_id, payload)
    VALUES (p_gseq, p_conv, current_setting('chat.op_kind'),
            nullif(current_setting('chat.op_message'), '')::bigint,
            nullif(current_setting('chat.op_payload'), ''))
$$;


INSERT INTO chat_schema_version (version) VALUES (5);
