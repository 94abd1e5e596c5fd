-- ngx_chat_module schema, version 6: members join and leave, and a
-- conversation's title, context and history setting change.
--
-- Membership is kept as of the events: a member added by the event at
-- gseq g receives the conversation's events from g on (chat_members
-- .joined_gseq; 0: since the conversation began); a member removed by the
-- event at gseq h keeps a span [joined_gseq, h] in chat_member_spans, so
-- that a client that catches up later gets exactly the events of the time
-- it was a member, its member.removed last.  Catch-up reads these spans;
-- the module's bus keeps the same spans per session.
--
-- A member added later reads history per the conversation's "history":
-- 'all' (the default) or 'since_join' (messages after joined_seq).
--
-- These are operations like edits (005): one event each, two steps, the
-- conversation row locked to the end so that sends wait for them (a
-- message committed after a removal is never the removed member's, one
-- before it always is).

ALTER TABLE chat_members ADD COLUMN joined_gseq bigint NOT NULL DEFAULT 0,
                         ADD COLUMN joined_seq bigint NOT NULL DEFAULT 0;

ALTER TABLE chat_conversations
    ADD COLUMN history text NOT NULL DEFAULT 'all'
        CHECK (history IN ('all', 'since_join'));

CREATE TABLE chat_member_spans (
    conversation_id  bigint NOT NULL,
    user_id          text NOT NULL,
    joined_gseq      bigint NOT NULL,
    left_gseq        bigint NOT NULL,
    joined_seq       bigint NOT NULL,
    left_seq         bigint NOT NULL
);

CREATE INDEX chat_member_spans_user ON chat_member_spans (user_id, left_gseq);


-- A delete removes a message's outbox rows: by message, not a scan.
CREATE INDEX chat_notifications_message ON chat_notifications (message_id);

-- message.new events written before version 3 kept their message in
-- payload: they are built from the message row now, like the others, so
-- that an edit or a delete shows in them too.
UPDATE chat_events e
SET message_id = (e.payload::jsonb -> 'message' ->> 'id')::bigint,
    payload = NULL
WHERE e.kind = 'message.new' AND e.message_id IS NULL
  AND e.payload IS NOT NULL;


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
        'history', c.history)::text
    FROM chat_conversations c WHERE c.id = p_id
$$;


-- History as version 5, from joined_seq on for a 'since_join'
-- conversation's member (a service token reads all of it).
CREATE OR REPLACE FUNCTION chat_history(p_user text, p_service boolean,
                                        p_conv bigint, p_before bigint,
                                        p_after bigint, p_limit int)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_rows  text;
    v_n     int;
    v_edge  bigint;
    v_from  bigint := 0;
    v_hist  text;
BEGIN
    SELECT c.history INTO v_hist FROM chat_conversations c WHERE c.id = p_conv;

    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF NOT p_service THEN
        SELECT CASE WHEN v_hist = 'since_join' THEN mb.joined_seq ELSE 0 END
        INTO v_from
        FROM chat_members mb
        WHERE mb.conversation_id = p_conv AND mb.user_id = p_user;

        IF NOT FOUND THEN
            RETURN 'forbidden';
        END IF;
    END IF;

    IF p_after IS NOT NULL THEN
        SELECT string_agg(left(chat_message_json(m), -1)
                   || ',"reactions":' || chat_reactions_json(m.id, p_user)
                   || ',"reply_count":' || (SELECT count(*)
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted)
                   || ',"last_reply":' || coalesce((SELECT '{"id":"' || r.id
                          || '","sender":' || to_json(r.sender)::text
                          || ',"created_at":"' || chat_ts(r.created_at) || '"}'
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted
                          ORDER BY r.seq DESC LIMIT 1), 'null') || '}', ','
                          ORDER BY m.seq),
               count(*), max(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.conversation_id = p_conv
                AND m.seq > greatest(p_after, v_from)
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq LIMIT p_limit) m;
    ELSE
        SELECT string_agg(left(chat_message_json(m), -1)
                   || ',"reactions":' || chat_reactions_json(m.id, p_user)
                   || ',"reply_count":' || (SELECT count(*)
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted)
                   || ',"last_reply":' || coalesce((SELECT '{"id":"' || r.id
                          || '","sender":' || to_json(r.sender)::text
                          || ',"created_at":"' || chat_ts(r.created_at) || '"}'
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted
                          ORDER BY r.seq DESC LIMIT 1), 'null') || '}', ','
                          ORDER BY m.seq DESC),
               count(*), min(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.conversation_id = p_conv AND m.seq > v_from
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq DESC LIMIT p_limit) m;
    END IF;

    RETURN '{"messages":[' || coalesce(v_rows, '') || '],"next":'
           || CASE WHEN v_n = p_limit THEN v_edge::text ELSE 'null' END
           || '}';
END;
$$;


-- Threads: a message's replies (reply_to, validated to be of the same
-- conversation by the send), counted when read -- never a write on the
-- send path.  History and replies write the reader's message object
-- inline: behind a function (chat_message_json_for(), kept for other
-- callers) its subqueries cost about 0.2 ms per message, inline 0.01.
CREATE INDEX chat_messages_replies ON chat_messages (reply_to, seq)
    WHERE reply_to IS NOT NULL;

CREATE OR REPLACE FUNCTION chat_message_json_for(m chat_messages,
                                                 p_viewer text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT left(chat_message_json(m), -1) || ',"reactions":'
        || chat_reactions_json(m.id, p_viewer)
        || ',"reply_count":' || coalesce(t.n, 0)
        || ',"last_reply":' || coalesce(t.last, 'null') || '}'
    FROM (SELECT (SELECT count(*) FROM chat_messages r
                  WHERE r.reply_to = m.id AND NOT r.deleted) AS n,
                 (SELECT '{"id":"' || r.id || '","sender":'
                         || to_json(r.sender)::text || ',"created_at":"'
                         || chat_ts(r.created_at) || '"}'
                  FROM chat_messages r
                  WHERE r.reply_to = m.id AND NOT r.deleted
                  ORDER BY r.seq DESC LIMIT 1) AS last) t
$$;


-- GET /messages/{id}/replies: as chat_history, over one message's replies
CREATE FUNCTION chat_replies(p_user text, p_service boolean, p_msg bigint,
                             p_before bigint, p_after bigint, p_limit int)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_conv  bigint;
    v_rows  text;
    v_n     int;
    v_edge  bigint;
    v_from  bigint := 0;
BEGIN
    SELECT m.conversation_id INTO v_conv FROM chat_messages m
    WHERE m.id = p_msg;

    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF NOT p_service THEN
        SELECT CASE WHEN c.history = 'since_join' THEN mb.joined_seq
                    ELSE 0 END
        INTO v_from
        FROM chat_members mb JOIN chat_conversations c ON c.id = v_conv
        WHERE mb.conversation_id = v_conv AND mb.user_id = p_user;

        IF NOT FOUND THEN
            RETURN 'forbidden';
        END IF;
    END IF;

    IF p_after IS NOT NULL THEN
        SELECT string_agg(left(chat_message_json(m), -1)
                   || ',"reactions":' || chat_reactions_json(m.id, p_user)
                   || ',"reply_count":' || (SELECT count(*)
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted)
                   || ',"last_reply":' || coalesce((SELECT '{"id":"' || r.id
                          || '","sender":' || to_json(r.sender)::text
                          || ',"created_at":"' || chat_ts(r.created_at) || '"}'
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted
                          ORDER BY r.seq DESC LIMIT 1), 'null') || '}', ','
                          ORDER BY m.seq),
               count(*), max(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.reply_to = p_msg AND m.seq > greatest(p_after, v_from)
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq LIMIT p_limit) m;
    ELSE
        SELECT string_agg(left(chat_message_json(m), -1)
                   || ',"reactions":' || chat_reactions_json(m.id, p_user)
                   || ',"reply_count":' || (SELECT count(*)
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted)
                   || ',"last_reply":' || coalesce((SELECT '{"id":"' || r.id
                          || '","sender":' || to_json(r.sender)::text
                          || ',"created_at":"' || chat_ts(r.created_at) || '"}'
                          FROM chat_messages r
                          WHERE r.reply_to = m.id AND NOT r.deleted
                          ORDER BY r.seq DESC LIMIT 1), 'null') || '}', ','
                          ORDER BY m.seq DESC),
               count(*), min(m.seq)
        INTO v_rows, v_n, v_edge
        FROM (SELECT * FROM chat_messages m
              WHERE m.reply_to = p_msg AND m.seq > v_from
                AND (p_before IS NULL OR m.seq < p_before)
              ORDER BY m.seq DESC LIMIT p_limit) m;
    END IF;

    RETURN '{"messages":[' || coalesce(v_rows, '') || '],"next":'
           || CASE WHEN v_n = p_limit THEN v_edge::text ELSE 'null' END
           || '}';
END;
$$;


-- The membership check of an operation holds the member row (KEY SHARE)
-- to the end: a removal waits for the operation, or the operation for the
-- removal, and their events come in that order -- an edit or a reaction
-- of a removed member never lands after its member.removed.
CREATE OR REPLACE FUNCTION chat_is_member(p_conv bigint, p_user text)
RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT EXISTS (SELECT 1 FROM chat_members mb
                   WHERE mb.conversation_id = p_conv AND mb.user_id = p_user
                   FOR KEY SHARE)
$$;


-- add_members / remove_member.  Who may: a service token, the
-- conversation's creator; a member may remove itself (leave).
CREATE FUNCTION chat_op_members(p_user text, p_service boolean, a jsonb,
                                p_add boolean)
RETURNS chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    c        chat_conversations;
    v_users  text[];
    v_who    text := a ->> 'user';
    v_mb     chat_members;
    v_json   text;
    v_event  text;
BEGIN
    SELECT * INTO c FROM chat_conversations x
    WHERE x.id = (a ->> 'conversation_id')::bigint
    FOR UPDATE;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'no such conversation');
    END IF;

    IF NOT p_service AND NOT chat_is_member(c.id, p_user) THEN
        RETURN chat_op_err('forbidden', 403,
                           'not a member of the conversation');
    END IF;

    IF c.kind = 'direct' THEN
        RETURN chat_op_err('bad_request', 400,
                           'the members of a direct conversation are fixed');
    END IF;

    IF NOT p_service AND c.created_by <> p_user
       AND NOT (NOT p_add AND v_who = p_user)
    THEN
        RETURN chat_op_err('forbidden', 403, 'only the creator of the '
                           || 'conversation or a service token changes its '
                           || 'members');
    END IF;

    IF p_add THEN
        SELECT array_agg(DISTINCT u ORDER BY u) INTO v_users
        FROM jsonb_array_elements_text(a -> 'members') u
        WHERE NOT chat_is_member(c.id, u);

        IF v_users IS NULL THEN
            RETURN chat_op_res('done', 200, c.id,
                '{"conversation":' || chat_conversation_json(c.id) || '}',
                NULL);
        END IF;

        IF c.member_count + cardinality(v_users)
           > coalesce((a ->> 'max')::int, 1000)
        THEN
            RETURN chat_op_err('too_large', 413, 'too many members');
        END IF;

        -- a new member starts caught up: nothing before it is unread
        INSERT INTO chat_members (conversation_id, user_id, joined_seq,
                                  read_seq, delivered_seq)
        SELECT c.id, u, c.last_seq, c.last_seq, c.last_seq
        FROM unnest(v_users) u;

        v_event := '{"kind":"member.added","conversation_id":"' || c.id
                   || '","members":' || to_json(v_users)::text
                   || ',"by":' || to_json(p_user)::text || '}';

        PERFORM chat_op_keep('member.added', NULL, v_event);
        PERFORM set_config('chat.op_users', to_json(v_users)::text, true);

        RETURN chat_op_res('ok', 200, c.id,
            '{"conversation":' || chat_conversation_json(c.id) || '}',
            v_event);
    END IF;

    DELETE FROM chat_members x
    WHERE x.conversation_id = c.id AND x.user_id = v_who
    RETURNING * INTO v_mb;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'not a member');
    END IF;

    v_event := '{"kind":"member.removed","conversation_id":"' || c.id
               || '","members":' || to_json(ARRAY[v_who])::text
               || ',"by":' || to_json(p_user)::text || '}';

    PERFORM chat_op_keep('member.removed', NULL, v_event);
    PERFORM set_config('chat.op_users', to_json(ARRAY[v_who])::text, true),
            set_config('chat.op_span', v_mb.joined_gseq || ','
                                       || v_mb.joined_seq || ','
                                       || c.last_seq, true);

    RETURN chat_op_res('ok', 200, c.id,
        '{"conversation":' || chat_conversation_json(c.id) || '}', v_event);
END;
$$;


-- title, context, history: the creator or a service token
CREATE FUNCTION chat_op_update(p_user text, p_service boolean, a jsonb)
RETURNS chat_op_row
LANGUAGE plpgsql AS $$
DECLARE
    c        chat_conversations;
    v_json   text;
    v_event  text;
BEGIN
    SELECT * INTO c FROM chat_conversations x
    WHERE x.id = (a ->> 'conversation_id')::bigint
    FOR UPDATE;

    IF NOT FOUND THEN
        RETURN chat_op_err('not_found', 404, 'no such conversation');
    END IF;

    IF NOT p_service AND NOT chat_is_member(c.id, p_user) THEN
        RETURN chat_op_err('forbidden', 403,
                           'not a member of the conversation');
    END IF;

    IF NOT p_service AND c.created_by <> p_user THEN
        RETURN chat_op_err('forbidden', 403, 'only the creator of the '
                           || 'conversation or a service token changes it');
    END IF;

    UPDATE chat_conversations x
    SET title = CASE WHEN a ? 'title' THEN a ->> 'title' ELSE x.title END,
        context = CASE WHEN a ? 'context' THEN a -> 'context'
                       ELSE x.context END,
        history = coalesce(a ->> 'history', x.history)
    WHERE x.id = c.id;

    v_json := chat_conversation_json(c.id);
    v_event := '{"kind":"conversation.updated","conversation_id":"' || c.id
               || '","conversation":' || v_json || '}';

    PERFORM chat_op_keep('conversation.updated', NULL, v_event);

    RETURN chat_op_res('ok', 200, c.id, '{"conversation":' || v_json || '}',
                       v_event);
END;
$$;


CREATE OR REPLACE FUNCTION chat_op_stage(p_key bigint, p_holder bigint,
                                         p_op text, p_user text,
                                         p_service boolean, p_args jsonb)
RETURNS SETOF chat_op_row
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

    -- a row another operation holds for long is not waited for: the
    -- caller is told to retry, and the pool connection is free again
    PERFORM set_config('lock_timeout', '2s', true);

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


-- Step 2, and what a membership change needs its position for: the
-- members added start there, a member removed keeps its span to it.
DROP FUNCTION chat_op_event(bigint, bigint);

CREATE FUNCTION chat_op_event(p_gseq bigint, p_conv bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_kind  text := current_setting('chat.op_kind');
    v_span  text[];
BEGIN
    INSERT INTO chat_events (gseq, conversation_id, kind, target_id, payload)
    VALUES (p_gseq, p_conv, v_kind,
            nullif(current_setting('chat.op_message'), '')::bigint,
            nullif(current_setting('chat.op_payload'), ''));

    IF v_kind = 'member.added' THEN
        UPDATE chat_members mb SET joined_gseq = p_gseq
        WHERE mb.conversation_id = p_conv
          AND mb.user_id IN (SELECT jsonb_array_elements_text(
                                 current_setting('chat.op_users')::jsonb));

    ELSIF v_kind = 'member.removed' THEN
        v_span := string_to_array(current_setting('chat.op_span'), ',');

        INSERT INTO chat_member_spans (conversation_id, user_id, joined_gseq,
                                       left_gseq, joined_seq, left_seq)
        SELECT p_conv, u, v_span[1]::bigint, p_gseq, v_span[2]::bigint,
               v_span[3]::bigint
        FROM jsonb_array_elements_text(
                 current_setting('chat.op_users')::jsonb) u;
    END IF;
END;
$$;


INSERT INTO chat_schema_version (version) VALUES (6);
