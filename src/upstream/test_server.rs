//! A bare HTTP/1.1 server for the upstream clients' tests: it answers every request with the same
//! bytes, written as they are (any head, any framing, garbage), and records each request's head.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The heads of the requests a server received, in order, as text.
pub type Heads = Arc<Mutex<Vec<String>>>;

/// An upstream client whose default provider is at `base_url`, with a 2 s timeout.
pub fn upstream_at(base_url: &str, key: Option<&str>) -> super::Upstream {
    use super::{ApiKey, Provider, UpstreamConfig};
    super::Upstream::new(UpstreamConfig {
        default: Provider::new("default", base_url, key.and_then(|k| ApiKey::new(k.into()))),
        providers: std::collections::HashMap::new(),
        timeout: Duration::from_secs(2),
        prices: std::collections::HashMap::new(),
        max_idle_per_host: 8,
    })
    .unwrap()
}

/// How an answer ends once written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Hang up.
    Close,
    /// Keep the connection open without a word more (an answer that never ends).
    Hold,
}

/// Listen on 127.0.0.1:0 and answer every request with `answer`; returns `http://ADDR`.
pub async fn answering(answer: impl Into<Bytes>, then: Then) -> (String, Heads) {
    answering_after(Duration::ZERO, answer, then).await
}

/// `answering`, each answer written `after` its request came.
pub async fn answering_after(
    after: Duration,
    answer: impl Into<Bytes>,
    then: Then,
) -> (String, Heads) {
    let answer: Bytes = answer.into();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let heads = Heads::default();
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (answer, seen) = (answer.clone(), seen.clone());
            tokio::spawn(async move {
                let Some(head) = read_request(&mut socket).await else {
                    return;
                };
                seen.lock().unwrap().push(head);
                tokio::time::sleep(after).await;
                // The client may hang up part way (a capped body): that ends the answer.
                if socket.write_all(&answer).await.is_err() {
                    return;
                }
                if then == Then::Hold {
                    let mut rest = [0u8; 64];
                    while socket.read(&mut rest).await.is_ok_and(|n| n > 0) {}
                }
            });
        }
    });
    (base, heads)
}

/// One request: its head as text, its body (by `content-length`) read and dropped.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = socket.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        seen.extend_from_slice(&buf[..n]);
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&seen[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = seen.len() - end;
    while body < length {
        body += socket.read(&mut buf).await.ok().filter(|&n| n > 0)?;
    }
    Some(head)
}

/// A `200 OK` head and `body` sent in `transfer-encoding: chunked` chunks of `chunk` bytes.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for part in body.chunks(chunk) {
        out.extend(one_chunk(part));
    }
    out.extend_from_slice(LAST_CHUNK);
    out
}

/// `part` framed as one chunk of a `transfer-encoding: chunked` body.
fn one_chunk(part: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", part.len()).into_bytes();
    out.extend_from_slice(part);
    out.extend_from_slice(b"\r\n");
    out
}

/// The chunk that ends a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Listen on 127.0.0.1:0 and answer every request with an event stream: a `200 OK` head, then
/// `events` events `every` apart, each its own chunk, then the body's end (or, with
/// `Then::Hold`, nothing more, the connection left open); returns `http://ADDR`.
pub async fn trickling(events: usize, every: Duration, then: Then) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_none() {
                    return;
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for i in 0..events {
                    let event = format!("data: {i}\n\n");
                    if socket
                        .write_all(&one_chunk(event.as_bytes()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
                if then == Then::Close {
                    let _ = socket.write_all(LAST_CHUNK).await;
                } else {
                    let mut rest = [0u8; 64];
                    while socket.read(&mut rest).await.is_ok_and(|n| n > 0) {}
                }
            });
        }
    });
    base
}

/// A whole answer with `status` (e.g. `200 OK`), `content-length` framing and `body`.
pub fn answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A chat completion with `content` and the given `usage` JSON.
pub fn completion(content: &str, usage: &str) -> String {
    format!(
        r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
    )
}
