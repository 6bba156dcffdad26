//! A lean HTTP/1.1 client for plain-`http://` upstreams — local inference servers (llama.cpp,
//! vLLM, Ollama) that speak HTTP/1.1 only, where a big batch holds one connection per call in
//! flight. It is hyper's connection API, with hyper's own buffers and limits, and a plain
//! per-origin pool of idle connections, without reqwest's and hyper-util's layers (~8.5 KiB
//! less allocated per call in flight). HTTPS upstreams (TLS, HTTP/2) and any upstream a proxy
//! variable applies to stay on reqwest (see `Upstream::exchange`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::Body;
use super::{ErrorKind, UpstreamError};

/// How long an idle connection is kept (as reqwest's pool keeps them).
const IDLE_FOR: Duration = Duration::from_secs(90);

/// How long a pooled connection must have sat idle for a hang-up before any answer to be taken
/// for the server's keep-alive running out as the request came (servers keep idle connections
/// for seconds: Node's HTTP server closes them after 5 s by default), and the call made again
/// at once on a fresh one.
const KEEP_ALIVE_RACE: Duration = Duration::from_secs(1);

/// How soon after the request a hang-up must come to be such a race: the server had closed the
/// connection before the request reached it. One later may follow work the server did on it.
const KEEP_ALIVE_HANG_UP: Duration = Duration::from_millis(250);

type Sender = SendRequest<Full<Bytes>>;

/// A response: a 2xx read whole, the start of any other.
pub(super) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Where completions go on a plain-`http://` upstream, worked out once per provider: the
/// request's path, its `Host` header, and the pool's key for the origin. The host and port only:
/// a `user:password@` in the URL is neither a connect target nor a `Host` header, nor shown in
/// an error (`Endpoint` sends it as Basic auth).
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub(super) path: Uri,
    pub(super) host: HeaderValue,
    /// `host:port`, the port 80 when the URL names none.
    pub(super) origin: String,
}

impl Target {
    /// `None` when `uri` names no host.
    pub fn new(uri: &Uri) -> Option<Target> {
        let authority = uri.authority()?;
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_string(),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(Target {
            path: path.parse().ok()?,
            host: HeaderValue::from_str(&host).ok()?,
            origin: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
        })
    }
}

#[derive(Debug)]
pub(super) struct PlainClient {
    /// Per origin, idle connections oldest first, each with the time it was last used.
    idle: Mutex<HashMap<String, VecDeque<(Sender, Instant)>>>,
    /// Idle connections kept per origin; one more coming back is closed.
    max_idle: usize,
    /// How long a connection is kept idle.
    idle_for: Duration,
    connect_timeout: Duration,
    /// How long a call may take until its answer's head, and a 2xx's body, are in.
    call_timeout: Duration,
    /// How long an error's body is waited for once its head is in (see `Body::read_error`),
    /// whatever is left of `call_timeout`: the status is known, and is the answer.
    error_wait: Duration,
}

impl PlainClient {
    pub fn new(
        connect_timeout: Duration,
        max_idle: usize,
        call_timeout: Duration,
        error_wait: Duration,
    ) -> PlainClient {
        PlainClient {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            idle_for: IDLE_FOR,
            connect_timeout,
            call_timeout,
            error_wait,
        }
    }

    /// POST `body` to `target` with `headers`, and read the answer: a 2xx whole (up to
    /// `MAX_ANSWER_BYTES`, past which the call fails), the start of any other (see
    /// `body::Body`). The head, and a 2xx's body, within the call timeout; an error's body
    /// within its own wait.
    pub async fn post(
        &self,
        target: &Target,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let origin = target.origin.as_str();
        let request = || -> Result<Request<Full<Bytes>>, UpstreamError> {
            let mut req = Request::post(target.path.clone())
                .header(header::HOST, target.host.clone())
                .body(Full::new(body.clone()))
                .map_err(|e| failed(ErrorKind::Rejected, e.to_string()))?;
            req.headers_mut().extend(headers.clone());
            Ok(req)
        };
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let late = || {
            let within = self.call_timeout.as_secs_f64();
            failed(
                ErrorKind::Timeout,
                format!("no whole answer within {within} s"),
            )
        };
        let head = async {
            // A pooled connection and how long it sat idle, or a fresh one.
            let (mut sender, idle) = match self.checkout(origin).await {
                Some((sender, idle)) => (sender, Some(idle)),
                None => (self.connect(origin).await?, None),
            };
            // Idle long enough for the server's keep-alive to run out meanwhile.
            let stale = idle.is_some_and(|idle| idle >= KEEP_ALIVE_RACE);
            let sent = tokio::time::Instant::now();
            let response = match sender.send_request(request()?).await {
                Ok(r) => r,
                // The server closed the pooled connection before the request went out (it was
                // never sent), or, on one idle a while, at once and before an answer's whole head
                // (its keep-alive ran out as the request came): once more, on a fresh
                // connection. Any other hang-up is not retried here: the server may have taken
                // the request and died on it (which the step's retries handle, with their
                // backoff), and sending it again at once could pay for it twice.
                Err(e)
                    if idle.is_some()
                        && (e.is_canceled()
                            || (stale
                                && e.is_incomplete_message()
                                && sent.elapsed() < KEEP_ALIVE_HANG_UP)) =>
                {
                    sender = self.connect(origin).await?;
                    sender.send_request(request()?).await.map_err(call_error)?
                }
                Err(e) => return Err(call_error(e)),
            };
            Ok((sender, response))
        };
        let (sender, response) = tokio::time::timeout_at(deadline, head)
            .await
            .map_err(|_| late())??;
        let (parts, mut incoming) = response.into_parts();
        let status = parts.status.as_u16();
        let mut body = Body::new(status, incoming.size_hint().exact())?;
        let is_error = body.is_error();
        // Dropped with the rest of the body unread (an error's, or one past the limit), the
        // connection is closed, not pooled.
        let read = async {
            while let Some(frame) = incoming.frame().await {
                let frame = frame
                    .map_err(|e| failed(ErrorKind::BadBody, format!("reading the body: {e}")))?;
                if let Ok(chunk) = frame.into_data()
                    && !body.take(&chunk)?
                {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let whole = match is_error {
            true => Body::read_error(self.error_wait, read).await,
            false => tokio::time::timeout_at(deadline, read)
                .await
                .map_err(|_| late())??,
        };
        if whole {
            self.checkin(origin, sender);
        }
        Ok(Answer {
            status,
            headers: parts.headers,
            body: body.into_bytes(),
        })
    }

    /// An idle connection to `origin` that can take a request now, if there is one: the one
    /// used last (the likeliest to be open still).
    async fn checkout(&self, origin: &str) -> Option<(Sender, Duration)> {
        loop {
            let (mut sender, since) = self
                .idle
                .lock()
                .expect("pool")
                .get_mut(origin)?
                .pop_back()?;
            if since.elapsed() > self.idle_for || sender.is_closed() {
                continue;
            }
            // Ready at once unless the connection is still finishing its last answer.
            if sender.ready().await.is_ok() {
                return Some((sender, since.elapsed()));
            }
        }
    }

    /// Keep `sender` for the next call to `origin`, unless the pool is full; connections idle
    /// too long are closed on the way.
    fn checkin(&self, origin: &str, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool");
        if !idle.contains_key(origin) {
            idle.insert(origin.to_string(), VecDeque::new());
        }
        let Some(conns) = idle.get_mut(origin) else {
            return;
        };
        while conns
            .front()
            .is_some_and(|(_, since)| since.elapsed() > self.idle_for)
        {
            conns.pop_front();
        }
        if conns.len() < self.max_idle {
            conns.push_back((sender, Instant::now()));
        }
    }

    async fn connect(&self, origin: &str) -> Result<Sender, UpstreamError> {
        let cannot = |e: &dyn std::fmt::Display| {
            failed(
                ErrorKind::Connect,
                format!("could not connect to {origin}: {e}"),
            )
        };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(origin))
            .await
            .map_err(|_| cannot(&"timed out"))?
            .map_err(|e| cannot(&e))?;
        stream.set_nodelay(true).map_err(|e| cannot(&e))?;
        // hyper's default read strategy: reads of 8 KiB to start with (larger while they come
        // back full), heads of up to ~408 KiB and 100 headers. An exact read size, which this
        // client used to set (4 KiB), is also the most a head may take, and heads from servers
        // behind nginx or LiteLLM (cookies, CORS) are longer; `max_buf_size`, the other knob,
        // cannot go below 8 KiB, so reads smaller than hyper's default are not to be had.
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| cannot(&e))?;
        tokio::spawn(async move {
            // Ends when the connection closes or every sender is gone; errors surface through
            // the request that was on it.
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// How a request failed on its way out or before its answer's head arrived.
fn call_error(e: hyper::Error) -> UpstreamError {
    if e.is_parse() {
        return failed(ErrorKind::NotHttp, super::error::not_http(&e));
    }
    // Resets and other transport failures mid-request, as with reqwest.
    failed(ErrorKind::Connect, super::error::with_sources(&e))
}

fn failed(kind: ErrorKind, detail: String) -> UpstreamError {
    UpstreamError::new(kind, None, format!("upstream call failed: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::test_server::{self, Then, answering, chunked};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What a test server saw: connections accepted, and those still open.
    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        open: AtomicUsize,
    }

    /// A bare HTTP/1.1 server answering every request with `ok` after `delay`; with `close`, it
    /// says `connection: close` and hangs up after each answer.
    async fn server(close: bool, delay: Duration) -> (Target, Arc<Seen>) {
        server_with(close, delay, false).await
    }

    /// `server`; with `drop_second`, its first connection reads a second request and hangs up
    /// without an answer after `delay` (at once: as a server whose keep-alive ran out as the
    /// request came does).
    async fn server_with(close: bool, delay: Duration, drop_second: bool) -> (Target, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let seen = Arc::new(Seen::default());
        let counts = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let first = counts.accepted.fetch_add(1, Ordering::SeqCst) == 0;
                let mut answered = 0;
                counts.open.fetch_add(1, Ordering::SeqCst);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = socket.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // Each test request is one small read: head and body together.
                        if !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        seen.clear();
                        if drop_second && first && answered == 1 {
                            tokio::time::sleep(delay).await;
                            break;
                        }
                        answered += 1;
                        tokio::time::sleep(delay).await;
                        let connection = if close { "close" } else { "keep-alive" };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: {connection}\r\n\r\nok"
                        );
                        socket.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            break;
                        }
                    }
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (Target::new(&uri.parse().unwrap()).unwrap(), seen)
    }

    /// A client connecting within 1 s, keeping `max_idle` connections per origin, with a 30 s
    /// call timeout and a 1 s wait for an error's body.
    fn client(max_idle: usize) -> PlainClient {
        let secs = Duration::from_secs;
        PlainClient::new(secs(1), max_idle, secs(30), secs(1))
    }

    async fn call(client: &PlainClient, uri: &Target) -> Answer {
        let headers = HeaderMap::new();
        client
            .post(uri, &headers, Bytes::from_static(b"{}"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_reused() {
        let (uri, seen) = server(false, Duration::ZERO).await;
        let client = client(8);
        for _ in 0..3 {
            let answer = call(&client, &uri).await;
            assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    // A kept connection, idle a second or more, that the server hangs up on once the request
    // is out (its keep-alive ran out as the request came) costs no attempt: the call is made
    // once more at once, on a fresh connection. Before, it failed as a reset, and waited out
    // the backoff on an attempt of its step.
    #[tokio::test]
    async fn a_kept_connection_hung_up_on_is_tried_again_on_a_fresh_one() {
        let (uri, seen) = server_with(false, Duration::ZERO, true).await;
        let pooled = client(8);
        for i in 0..3 {
            if i > 0 {
                tokio::time::sleep(KEEP_ALIVE_RACE).await;
            }
            let answer = call(&pooled, &uri).await;
            assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        // On a connection in use moments ago, such a hang-up is the call's error: the server
        // may have taken the request, and sending it again at once could pay for it twice.
        let (uri, _) = server_with(false, Duration::ZERO, true).await;
        let busy = client(8);
        call(&busy, &uri).await;
        let headers = HeaderMap::new();
        let second = busy.post(&uri, &headers, Bytes::from_static(b"{}")).await;
        assert!(second.is_err(), "the second call was answered");
        // Nor on an idle one that hangs up a while after the request: the server had it.
        let (uri, _) = server_with(false, Duration::from_millis(400), true).await;
        let idle = client(8);
        call(&idle, &uri).await;
        tokio::time::sleep(KEEP_ALIVE_RACE).await;
        let second = idle.post(&uri, &headers, Bytes::from_static(b"{}")).await;
        assert!(second.is_err(), "the second call was answered");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_used_again() {
        let (uri, seen) = server(true, Duration::ZERO).await;
        let client = client(8);
        for _ in 0..3 {
            let answer = call(&client, &uri).await;
            assert_eq!(answer.status, 200);
            // Give the connection's task time to see the hang-up.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
    }

    /// `n` calls at once (each on a connection of its own while the server holds its answer).
    async fn calls_at_once(client: &PlainClient, uri: &Target, n: usize) {
        let answers = futures::future::join_all((0..n).map(|_| call(client, uri))).await;
        assert!(answers.iter().all(|a| a.status == 200));
    }

    // A worker's load swings (3 panel calls per job, then 1, then 1): with room in the pool for
    // every connection it had busy, the next swing reuses them all; with less, it opens anew
    // what the pool closed.
    #[tokio::test]
    async fn the_pool_keeps_as_many_idle_connections_as_it_has_room_for() {
        for (max_idle, accepted) in [(6, 6), (2, 10)] {
            let (uri, seen) = server(false, Duration::from_millis(50)).await;
            let client = client(max_idle);
            calls_at_once(&client, &uri, 6).await;
            calls_at_once(&client, &uri, 6).await;
            assert_eq!(
                seen.accepted.load(Ordering::SeqCst),
                accepted,
                "connections opened with room for {max_idle} idle ones"
            );
        }
    }

    // Connections under the one in use stay idle until they are too old, and are closed then.
    // A late wake-up can only age the three more; the one in use has 2.4 s and 1.2 s to spare.
    #[tokio::test]
    async fn connections_idle_too_long_are_closed() {
        let (uri, seen) = server(false, Duration::from_millis(20)).await;
        let client = PlainClient {
            idle_for: Duration::from_secs(4),
            ..client(8)
        };
        calls_at_once(&client, &uri, 4).await;
        // The last one back is used again and stays fresh; the three under it age.
        tokio::time::sleep(Duration::from_millis(1600)).await;
        call(&client, &uri).await;
        tokio::time::sleep(Duration::from_millis(2800)).await;
        call(&client, &uri).await;
        let waited = Instant::now();
        while seen.open.load(Ordering::SeqCst) > 1 && waited.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.open.load(Ordering::SeqCst), 1);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 4);
    }

    fn completions_at(base: &str) -> Target {
        Target::new(&format!("{base}/v1/chat/completions").parse().unwrap()).unwrap()
    }

    // An upstream at the wrong URL, or one ignoring `stream: false`, can send without end: the
    // body is cut at the limit and the call fails for good (a retry would get the same).
    #[tokio::test]
    async fn a_body_past_the_limit_is_a_final_error() {
        let body = vec![b'x'; 20 << 20];
        let (base, _) = answering(chunked(&body, 64 << 10), Then::Close).await;
        let client = client(8);
        let headers = HeaderMap::new();
        let err = client
            .post(&completions_at(&base), &headers, Bytes::new())
            .await
            .err()
            .expect("a body over the limit is refused");
        assert!(!err.retryable(), "{err:?}");
        assert_eq!(err.message, "upstream answer larger than 16777216 bytes");
    }

    // An error's body is only its message: the start of it is kept and the rest is not waited
    // for (this one announces 100 MiB, sends 64 KiB and then nothing).
    #[tokio::test]
    async fn only_the_start_of_an_error_body_is_read() {
        let mut answer =
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 104857600\r\n\r\n".to_vec();
        answer.extend_from_slice(&[b'e'; 64 << 10]);
        let (base, _) = answering(answer, Then::Hold).await;
        let client = client(8);
        let headers = HeaderMap::new();
        let uri = completions_at(&base);
        let call = client.post(&uri, &headers, Bytes::new());
        let answer = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the error is not read to its end")
            .unwrap();
        assert_eq!(answer.status, 500);
        assert_eq!(answer.body.len(), 8192);
    }

    // Servers behind nginx or LiteLLM send long heads (cookies, CORS): past 4 KiB, and up to
    // hyper's own limits, they are read.
    #[tokio::test]
    async fn a_head_of_several_kib_is_read() {
        let pad = "a".repeat(5000);
        let answer = format!("HTTP/1.1 200 OK\r\nx-pad: {pad}\r\ncontent-length: 2\r\n\r\nok");
        let (base, _) = answering(answer, Then::Close).await;
        let client = client(8);
        let answer = call(&client, &completions_at(&base)).await;
        assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
        assert_eq!(answer.headers["x-pad"], pad.as_str());
    }

    // `user:password@` in the URL is for the `Authorization` header (see `Endpoint`): the
    // connection goes to the host, the `Host` header names the host, errors name the host.
    #[tokio::test]
    async fn userinfo_is_neither_the_host_nor_the_connect_target() {
        let (base, heads) = answering(test_server::answer("200 OK", "ok"), Then::Close).await;
        let with_user = base.replace("http://", "http://user:secret@");
        let client = client(8);
        let answer = call(&client, &completions_at(&with_user)).await;
        assert_eq!(answer.status, 200);
        let head = heads.lock().unwrap()[0].clone();
        let host = base.trim_start_matches("http://");
        assert!(head.contains(&format!("\r\nhost: {host}\r\n")), "{head}");
        assert!(!head.contains("secret"), "{head}");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refused = format!("http://user:secret@{}", listener.local_addr().unwrap());
        drop(listener);
        let headers = HeaderMap::new();
        let err = client
            .post(&completions_at(&refused), &headers, Bytes::new())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Connect);
        assert!(!err.message.contains("secret"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/v1", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let uri = Target::new(&uri).unwrap();
        drop(listener);
        let client = client(8);
        let headers = HeaderMap::new();
        let err = client
            .post(&uri, &headers, Bytes::new())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind, ErrorKind::Connect);
        assert!(err.message.contains("could not connect"), "{}", err.message);
    }
}
