// Types of client/chat.js, the browser client of ngx_chat_module.
// The wire shapes are docs/PROTOCOL.md's; ids are strings, seq numbers.

export type TransportName = 'websocket' | 'sse' | 'poll';

export type ConnectionState =
  | 'idle'        // not started
  | 'connecting'  // opening a transport
  | 'connected'   // events flow
  | 'retrying'    // waiting `retryInMs` before the next attempt
  | 'offline'     // the browser says it is offline; retries when it is back
  | 'closed';     // close() was called

export interface StateInfo {
  state: ConnectionState;
  transport: TransportName | null;
  /** ms until the next attempt while 'retrying' */
  retryInMs?: number;
  /** when 'retrying': Date.now() of the next attempt */
  retryAt?: number;
  /** a sentence for a person, e.g. "Offline — retrying in 8 s" */
  text: string;
  /** this tab holds the connection (the others relay through it) */
  leader: boolean;
  error?: ChatError;
}

export interface ChatError {
  code: string;             // PROTOCOL §2 codes, plus 'network', 'closed', 'timeout',
                            // 'going_away' (1001), 'slow' (4008)
  message: string;          // for a person
  retry_after_ms?: number;
  status?: number;          // HTTP status, REST only
}

export interface Attachment { id: string; name: string; mime: string; size: number; url: string; }

export interface Reaction { emoji: string; count: number; me: boolean; }

/** 'discarded': the last event of a message discard() removed */
export type SendState = 'sending' | 'sent' | 'delivered' | 'read' | 'failed' | 'discarded';

export interface Message {
  id: string | null;               // null until the server stored it
  conversation_id: string;
  seq: number | null;              // null until stored
  sender: string;
  created_at: string;
  client_msg_id: string | null;
  body: string;
  format: 'text' | 'markdown' | 'system';
  reply_to?: string | null;
  attachments: Attachment[];
  mentions?: string[];
  edited_at: string | null;
  deleted: boolean;
  reactions?: Reaction[];
  reply_count?: number;
  /** own messages only */
  state?: SendState;
  /** when state is 'failed' */
  error?: ChatError;
}

export interface Receipt { user: string; delivered_seq: number; read_seq: number; }

export interface Conversation {
  id: string;
  kind: 'direct' | 'group';
  title: string | null;
  context: any;
  members: string[];
  last_seq: number;
  created_at: string;
  created_by?: string;
  archived?: boolean;
  last_message?: Message | null;
  unread_count: number;
  receipts?: Receipt[];
}

export interface PresenceInfo { user: string; status: 'online' | 'away' | 'offline'; last_seen: string | null; }

export interface ChatOptions {
  /** the chat location, e.g. "https://chat.example.com/chat" or "/chat" */
  url: string;
  /** returns a JWT; called at start, before expiry and on token_expired.
   *  `force` asks for a new one (the last one was refused or expires). */
  token: (force: boolean) => Promise<string>;
  /** transports to try, in order (default all three) */
  transports?: TransportName[];
  /** reconnect backoff (ms): full jitter over base·2^n up to cap; default 500 → 30000 */
  backoffBase?: number;
  backoffCap?: number;
  /** how long the transport that worked is remembered (default 10 min) */
  transportMemoryMs?: number;
  /** while on SSE or long-poll, how often WebSocket is tried again (default 60 s) */
  probeIntervalMs?: number;
  /** one connection per browser through a leader tab (default true) */
  shareConnection?: boolean;
  /** IndexedDB database name for the outbox and cache; false: memory only */
  storage?: string | false;
  /** device id sent to the server (default: one per browser, kept in localStorage) */
  deviceId?: string;
  /** typing: a start is repeated this often while typing, stop after this idle (ms) */
  typingRefreshMs?: number;
  typingIdleMs?: number;
  /** reads are sent at most this often per conversation (ms, default 500) */
  readDelayMs?: number;
  /** send presence 'away' while every tab is hidden (default true) */
  presence?: boolean;
  /** a registration of client/chat-sw.js (served from the page's origin):
   *  with Background Sync the browser sends the outbox when the network
   *  returns, even after the tabs closed (Chromium; ignored elsewhere) */
  serviceWorker?: ServiceWorkerRegistration | Promise<ServiceWorkerRegistration>;
}

export interface SendOptions {
  format?: 'text' | 'markdown';
  reply_to?: string;
  /** upload ids, or what upload() answered (shown while the message waits) */
  attachments?: (string | Attachment)[];
  mentions?: string[];
}

export interface HistoryPage { messages: Message[]; next: number | null; }

export interface ChatEvents {
  state: StateInfo;
  /** a message was added or changed (new, optimistic, acked, edited, deleted, reactions, state) */
  message: Message;
  /** a conversation was added or changed (unread_count, last_message, members, title …);
   *  `{ id, removed: true }` when the user left it or it is gone from the list */
  conversation: Conversation | { id: string; removed: true };
  /** users typing in a conversation now (other than me) */
  typing: { conversation_id: string; users: string[] };
  presence: PresenceInfo;
  receipt: { conversation_id: string; receipts: Receipt[] };
  /** the sum of unread_count over conversations */
  unread: { total: number };
  /** the server could not resume; state was reloaded over REST */
  resync: { reason: string };
  /** every raw server event (durable and ephemeral) */
  event: any;
  /** this tab became the one that holds the connection */
  leader: { leader: boolean };
}

export declare class ChatClient {
  constructor(options: ChatOptions);
  readonly user: { id: string; name: string; role: string } | null;
  readonly info: StateInfo;
  readonly cursor: string | null;
  /** starts connecting; resolves once the client knows who the user is */
  start(): Promise<void>;
  /** ends the connection, every timer and listener */
  close(): Promise<void>;
  on<K extends keyof ChatEvents>(event: K, fn: (data: ChatEvents[K]) => void): () => void;
  off<K extends keyof ChatEvents>(event: K, fn: (data: ChatEvents[K]) => void): void;

  conversations(): Conversation[];
  conversation(id: string): Conversation | undefined;
  loadConversations(): Promise<Conversation[]>;
  /** refreshes one conversation (receipts, unread) */
  loadConversation(id: string): Promise<Conversation>;
  createConversation(args: { kind: 'direct' | 'group'; members: string[]; title?: string; context?: any }): Promise<Conversation>;
  /** the messages held for a conversation, by seq, then unsent ones in the order typed */
  messages(conversationId: string): Message[];
  /** loads the page before `beforeSeq` (or the newest page) and merges it */
  loadHistory(conversationId: string, opts?: { beforeSeq?: number; limit?: number }): Promise<HistoryPage>;

  /** optimistic: the message shows at once ('sending'); resolves with the stored message */
  send(conversationId: string, body: string, opts?: SendOptions): Promise<Message>;
  retry(clientMsgId: string): Promise<Message>;
  discard(clientMsgId: string): Promise<void>;
  edit(messageId: string, body: string): Promise<Message>;
  delete(messageId: string): Promise<Message>;
  react(messageId: string, emoji: string): Promise<any>;
  unreact(messageId: string, emoji: string): Promise<any>;
  /** marks read up to seq (coalesced; default: the newest held message) */
  markRead(conversationId: string, seq?: number): void;
  /** call on every keystroke: debounced start, automatic stop */
  typing(conversationId: string): void;
  stopTyping(conversationId: string): void;
  typingUsers(conversationId: string): string[];
  presence(user: string): PresenceInfo | undefined;
  fetchPresence(users: string[]): Promise<PresenceInfo[]>;
  /** the users whose presence this page shows (large groups) */
  subscribePresence(users: string[]): void;
  receipts(conversationId: string): Receipt[];
  upload(file: Blob, name?: string): Promise<Attachment>;
  /** a URL the page can use in <img src> / <a href> for an attachment (object URL) */
  attachmentUrl(att: Attachment): Promise<string>;
  search(q: string, opts?: { conversation_id?: string; limit?: number; cursor?: string;
                             mode?: 'newest' | 'rank' }): Promise<any>;
  block(user: string): Promise<void>;
  unblock(user: string): Promise<void>;
  blocks(): Promise<string[]>;
  report(messageId: string, reason: string, note?: string): Promise<any>;
  /** any REST call: rest('GET', '/me') */
  rest(method: string, path: string, body?: any): Promise<any>;
}

/** backoff: 0 for attempt 0, else full jitter in [base/4, min(cap, base·2^(attempt-1))] */
export declare function backoffDelay(attempt: number, base: number, cap: number, rand?: () => number): number;
/** a person's sentence for an error */
export declare function errorText(err: ChatError): string;
/** the conversation/message store without any I/O (exported for tests) */
export declare class ChatStore { constructor(me?: string); }
