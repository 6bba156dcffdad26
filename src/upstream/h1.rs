//! A lean HTTP/1.1 client for plain-`http://` upstreams — local inference servers (llama.cpp,
//! vLLM, Ollama) that speak HTTP/1.1 only, where a big batch holds one connection per call in
//! flight. It is hyper's connection API with a read buffer sized for chat completions and a
//! plain per-origin pool of idle connections, without reqwest's layers: roughly half of the
//! memory reqwest takes per call in flight. HTTPS upstreams (TLS, HTTP/2) and any upstream a
//! proxy variable applies to stay on reqwest (see `Upstream::exchange`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderMap};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{ErrorKind, UpstreamError};

/// Bytes asked of the socket per read. hyper's default reserves 8 KiB per connection up front
/// and keeps it for the connection's life; a completion's head and a short body fit in 4 KiB,
/// and a longer one takes a few reads.
const READ_BUF: usize = 4096;
/// Idle connections kept per origin, and for how long (as reqwest is configured).
const MAX_IDLE: usize = 256;
const IDLE_FOR: Duration = Duration::from_secs(90);

type Sender = SendRequest<Full<Bytes>>;

/// A response, read whole.
pub(super) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug)]
pub(super) struct PlainClient {
    idle: Mutex<HashMap<String, Vec<(Sender, Instant)>>>,
    connect_timeout: Duration,
}

impl PlainClient {
    pub fn new(connect_timeout: Duration) -> PlainClient {
        PlainClient {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// POST `body` to `uri` (an `http://` URI with a host) with `headers`, and read the answer
    /// whole. No timeout of its own beyond connecting: the caller bounds the whole exchange.
    pub async fn post(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Answer, UpstreamError> {
        let authority = uri
            .authority()
            .ok_or_else(|| failed(ErrorKind::Connect, format!("no host in {uri}")))?;
        let origin = match authority.port_u16() {
            Some(_) => authority.as_str().to_string(),
            None => format!("{}:80", authority.host()),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = || -> Result<Request<Full<Bytes>>, UpstreamError> {
            let mut req = Request::post(path)
                .header(header::HOST, authority.as_str())
                .body(Full::new(body.clone()))
                .map_err(|e| failed(ErrorKind::Rejected, e.to_string()))?;
            req.headers_mut().extend(headers.clone());
            Ok(req)
        };
        let (mut sender, reused) = match self.checkout(&origin).await {
            Some(sender) => (sender, true),
            None => (self.connect(&origin).await?, false),
        };
        let response = match sender.send_request(request()?).await {
            Ok(r) => r,
            // The server closed the pooled connection before the request went out (it was
            // never sent): once more, on a fresh connection.
            Err(e) if reused && e.is_canceled() => {
                sender = self.connect(&origin).await?;
                sender.send_request(request()?).await.map_err(call_error)?
            }
            Err(e) => return Err(call_error(e)),
        };
        let (parts, incoming) = response.into_parts();
        let body = incoming
            .collect()
            .await
            .map_err(|e| failed(ErrorKind::BadBody, format!("reading the body: {e}")))?
            .to_bytes();
        self.checkin(origin, sender);
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }

    /// An idle connection to `origin` that can take a request now, if there is one.
    async fn checkout(&self, origin: &str) -> Option<Sender> {
        loop {
            let (mut sender, since) = self.idle.lock().expect("pool").get_mut(origin)?.pop()?;
            if since.elapsed() > IDLE_FOR || sender.is_closed() {
                continue;
            }
            // Ready at once unless the connection is still finishing its last answer.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn checkin(&self, origin: String, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool");
        let conns = idle.entry(origin).or_default();
        if conns.len() < MAX_IDLE {
            conns.push((sender, Instant::now()));
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
        let (sender, conn) = http1::Builder::new()
            .read_buf_exact_size(Some(READ_BUF))
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
    // Resets and other transport failures mid-request, as with reqwest.
    failed(ErrorKind::Connect, super::with_sources(&e))
}

fn failed(kind: ErrorKind, detail: String) -> UpstreamError {
    UpstreamError::new(kind, None, format!("upstream call failed: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A bare HTTP/1.1 server answering every request with `ok`; with `close`, it says
    /// `connection: close` and hangs up after each answer. Counts the connections it accepted.
    async fn server(close: bool) -> (Uri, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = socket.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        // Each test request is one small read: head and body together.
                        if !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        seen.clear();
                        let connection = if close { "close" } else { "keep-alive" };
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: {connection}\r\n\r\nok"
                        );
                        socket.write_all(answer.as_bytes()).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (uri.parse().unwrap(), accepted)
    }

    async fn call(client: &PlainClient, uri: &Uri) -> Answer {
        let headers = HeaderMap::new();
        client
            .post(uri, &headers, Bytes::from_static(b"{}"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn idle_connections_are_reused() {
        let (uri, accepted) = server(false).await;
        let client = PlainClient::new(Duration::from_secs(1));
        for _ in 0..3 {
            let answer = call(&client, &uri).await;
            assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_used_again() {
        let (uri, accepted) = server(true).await;
        let client = PlainClient::new(Duration::from_secs(1));
        for _ in 0..3 {
            let answer = call(&client, &uri).await;
            assert_eq!(answer.status, 200);
            // Give the connection's task time to see the hang-up.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/v1", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let client = PlainClient::new(Duration::from_secs(1));
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
