-- ngx_chat_module schema, version 3: commits that do not queue behind one
-- row lock.
--
-- Until version 2 every writing transaction bumped chat_clock.v and held
-- that row lock to commit, so transactions committed one after another in
-- gseq order: PostgreSQL could not merge their WAL flushes (group commit),
-- and the whole system stored at most about one batch per flush.
--
-- Now gseq positions are handed out by the module (a counter in its shared
-- zone) only after a transaction has done everything that can wait on a
-- lock: a send batch runs in two steps inside one transaction,
--   1. chat_send_stage(): lock the conversations, check, number and insert
--      the messages (returns what was stored; nothing has a gseq yet);
--   2. chat_send_events(): with the positions the module reserved for the
--      stored messages, insert their events, then COMMIT.
-- Transactions commit in any order; the module's readers deliver strictly
-- in gseq order and never hand out a cursor past a position whose
-- transaction may still commit (see ngx_chat_bus.c).  A position whose
-- transaction rolled back stays empty for good.
--
-- Each transaction holds two advisory locks to its end:
--   - its own key, exclusively: once that lock is free the transaction has
--     ended, so a reservation whose outcome the module did not see (lost
--     connection, killed worker) is settled by reading the store after it;
--   - the module instance's key (chat_clock.holder), shared: a freshly
--     started nginx waits until no transaction of the instance before it is
--     still running before it hands out positions.
--
-- chat_clock.v is now the end of the positions handed out: the module
-- takes them in chunks (UPDATE chat_clock SET v = v + n RETURNING: one
-- short row lock per chunk of 65,536 events, not one per commit) and
-- hands them out from its shared zone.  Every committed event has
-- gseq <= v.  A SQL caller outside the module takes single positions the
-- same way (chat_create_conversation() below); its transaction holds the
-- row to commit as before, so whatever lies below v and outside the
-- module's chunks is settled once v has been read.

ALTER TABLE chat_clock ADD COLUMN holder bigint NOT NULL DEFAULT 0;

-- message events are served from chat_messages: one narrow row per event
ALTER TABLE chat_events ADD COLUMN message_id bigint;
ALTER TABLE chat_events ALTER COLUMN payload DROP NOT NULL;


-- The message.new event object around a message object: one shape for
-- the event a send returns and the one readers of the log build.  STABLE
-- like the bigint || text in it: a function declared IMMUTABLE over a
-- STABLE body is not inlined, and as a real call per row it made catch-up
-- pages several times slower.
CREATE FUNCTION chat_message_event_json(p_conv bigint, p_seq bigint,
                                        p_message text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"kind":"message.new","conversation_id":"' || p_conv
        || '","seq":' || p_seq || ',"message":' || p_message || '}'
$$;


CREATE FUNCTION chat_message_event(m chat_messages) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT chat_message_event_json(m.conversation_id, m.seq,
                                   chat_message_json(m))
$$;


-- The event object of a chat_events row, for readers of the log.
CREATE FUNCTION chat_event_payload(e chat_events) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(e.payload,
                    (SELECT chat_message_event(m) FROM chat_messages m
                     WHERE m.id = e.message_id))
$$;


-- Step 1 of a send batch: everything but the events.  Items as for
-- chat_send_batch() of version 2, which it replaces (dropped below).  Returns one row per item, in item order: status, the
-- conversation, the id of the message stored now ('ok'), the message
-- object ('ok', 'dup') and the event object ('ok').
--
-- Its probes are index lookups per item, each a LATERAL subquery with
-- LIMIT 1 so that the planner cannot flatten it into a join: estimating
-- 100 items, it would otherwise hash whole tables while they are small (a
-- new installation, a benchmark), a plan the function's plan cache then
-- keeps as they grow (2-5 ms a batch here instead of 0.2).
CREATE FUNCTION chat_send_stage(p_key bigint, p_holder bigint,
                                p_items jsonb)
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
                             AND m.client_msg_id = it.cmid LIMIT 1) p ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_conversations c
                           WHERE c.id = it.conv LIMIT 1) ex ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_members mb
                           WHERE mb.conversation_id = it.conv
                             AND mb.user_id = it.sender LIMIT 1) mem ON true
        LEFT JOIN LATERAL (SELECT true AS ok FROM chat_messages m
                           WHERE m.id = it.reply_to
                             AND m.conversation_id = it.conv LIMIT 1) rt
               ON true
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


-- Step 2: the events of the messages stored by step 1, at the positions
-- p_base, p_base + 1, ... in array order.
CREATE FUNCTION chat_send_events(p_base bigint, p_convs bigint[],
                                 p_ids bigint[])
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO chat_events (gseq, conversation_id, kind, message_id)
    SELECT p_base + u.ord - 1, u.c, 'message.new', u.i
    FROM unnest(p_convs, p_ids) WITH ORDINALITY AS u (c, i, ord)
$$;


-- Creating a conversation, step 1 (in a transaction the module keeps
-- open): the conversation and its members, without the event.  A direct
-- conversation that exists already is returned with o_created = false.
CREATE FUNCTION chat_create_stage(p_key bigint, p_holder bigint,
                                  p_creator text, p_kind text,
                                  p_members text[], p_title text,
                                  p_context jsonb)
RETURNS TABLE (o_created boolean, o_conv bigint, o_json text, o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_members  text[];
    v_key      text;
    v_id       bigint;
    v_json     text;
BEGIN
    PERFORM pg_advisory_xact_lock(p_key),
            pg_advisory_xact_lock_shared(p_holder);

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
                            NULL::text;
        RETURN;
    END IF;

    INSERT INTO chat_members (conversation_id, user_id)
    SELECT v_id, u FROM unnest(v_members) u;

    v_json := chat_conversation_json(v_id);

    RETURN QUERY SELECT true, v_id, v_json,
        '{"kind":"conversation.created","conversation_id":"' || v_id
        || '","conversation":' || v_json || '}';
END;
$$;


-- Step 2: its conversation.created event at p_gseq, the same object step
-- 1 returned (the same transaction sees the same rows).
CREATE FUNCTION chat_create_event(p_gseq bigint, p_conv bigint)
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO chat_events (gseq, conversation_id, kind, payload)
    SELECT p_gseq, p_conv, 'conversation.created',
           '{"kind":"conversation.created","conversation_id":"' || p_conv
           || '","conversation":' || chat_conversation_json(p_conv) || '}'
$$;


-- For SQL callers outside the module (tests, tools): one position above
-- every chunk handed out so far, with the clock row held to commit as
-- before.  A running module finds the event in the store (its next chunk
-- starts above it).
CREATE OR REPLACE FUNCTION chat_create_conversation(p_creator text,
                                                   p_kind text,
                                                   p_members text[],
                                                   p_title text,
                                                   p_context jsonb)
RETURNS TABLE (o_created boolean, o_conv bigint, o_json text, o_gseq bigint,
               o_event text)
LANGUAGE plpgsql AS $$
DECLARE
    v_g  bigint;
    r    record;
BEGIN
    UPDATE chat_clock SET v = v + 1 RETURNING v INTO v_g;

    SELECT * INTO r
    FROM chat_create_stage((random() * 9e18)::bigint, 0, p_creator, p_kind,
                           p_members, p_title, p_context);

    IF r.o_created THEN
        PERFORM chat_create_event(v_g, r.o_conv);
    END IF;

    RETURN QUERY SELECT r.o_created, r.o_conv, r.o_json,
                        CASE WHEN r.o_created THEN v_g END, r.o_event;
END;
$$;


-- Settles a reservation whose outcome the module did not see.  Returns
-- nothing while the transaction that holds p_key may still commit;
-- otherwise one row (settled = true, no event) followed by the events
-- committed in [p_lo, p_hi].  The events are read by a statement of their
-- own, after the lock test: its snapshot sees what that transaction
-- committed.
CREATE FUNCTION chat_settle(p_key bigint, p_lo bigint, p_hi bigint)
RETURNS TABLE (o_gseq bigint, o_conv bigint, o_payload text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'chat_settle needs read committed';
    END IF;

    IF NOT pg_try_advisory_xact_lock(p_key) THEN
        RETURN;
    END IF;

    RETURN QUERY SELECT 0::bigint, 0::bigint, NULL::text;

    RETURN QUERY
    SELECT e.gseq, e.conversation_id, chat_event_payload(e)
    FROM chat_events e
    WHERE e.gseq BETWEEN p_lo AND p_hi
    ORDER BY e.gseq;
END;
$$;


-- Where a freshly started module begins: the end of the positions handed
-- out so far.  Unless p_force, NULL while a transaction of the module
-- instance that started before it is still running: a new nginx waits
-- (bounded, in the module) for what an nginx killed before it left
-- running in PostgreSQL, so that nothing commits behind positions it has
-- passed.  Records the new instance's key.
CREATE FUNCTION chat_clock_start(p_holder bigint, p_force boolean)
RETURNS TABLE (o_v bigint, o_epoch text, o_top bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_old  bigint;
BEGIN
    -- waits for a transaction that takes a chunk right now
    SELECT holder INTO v_old FROM chat_clock FOR UPDATE;

    IF NOT p_force AND v_old <> 0 AND v_old <> p_holder THEN
        IF NOT pg_try_advisory_xact_lock(v_old) THEN
            RETURN QUERY SELECT NULL::bigint, NULL::text, NULL::bigint;
            RETURN;
        END IF;
    END IF;

    UPDATE chat_clock SET holder = p_holder;

    RETURN QUERY SELECT c.v, c.epoch,
                        (SELECT coalesce(max(gseq), 0) FROM chat_events)
                 FROM chat_clock c;
END;
$$;


-- replaced by chat_send_stage() and chat_send_events()
DROP FUNCTION chat_send_batch(jsonb);


INSERT INTO chat_schema_version (version) VALUES (3);
