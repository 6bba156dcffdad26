//! The thin gateway: a model that is not a fusion model goes to its provider, and the answer
//! (status, the headers a client acts on, body as it arrives) comes back. An event stream is
//! passed on an event at a time, so one cut part way still ends as the SDKs read a failure.

use std::borrow::Cow;
use std::pin::Pin;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::upstream::UpstreamError;

/// The body goes to the model's provider and its answer comes back (see [`relayed`]).
pub async fn passthrough(
    state: &AppState,
    model: &str,
    body: Value,
    depth: u32,
) -> Result<Response, ApiError> {
    let (resp, key) = state
        .upstream
        .relay(model, body, depth + 1)
        .await
        .map_err(ApiError::upstream)?;
    // A refusal of this server's credentials is answered as ours (see `ApiError::upstream`),
    // not passed on: the client's SDK would raise an authentication error about its own key.
    // A 403 that its body shows to be the input's refusal (a moderation's) goes out as the
    // provider's status, with its message.
    if UpstreamError::status_refuses_our_credentials(resp.status().as_u16()) {
        return Err(ApiError::upstream(
            state.upstream.relayed_error(resp, key).await,
        ));
    }
    Ok(relayed(resp, key.map(str::to_string)))
}

/// Whether a relayed header is passed on: the content type, when to retry and whether to, the
/// rate limits and the request id; not the rest (cookies, the upstream's own framing).
fn passed_on(name: &str) -> bool {
    matches!(
        name,
        "content-type" | "retry-after" | "retry-after-ms" | "x-should-retry" | "x-request-id"
    ) || name.starts_with("x-ratelimit-")
}

/// The upstream's answer as the client gets it. An event stream goes out an event at a time
/// (nginx asked not to buffer it, as ours are); cut part way (the upstream gone, or silent past
/// the timeout), the unfinished event is dropped and an error event and `[DONE]` end it,
/// rather than the connection reset (which the Python SDK raises as a raw transport error) or
/// half an event running into the error (which it cannot parse). Any other body is passed on
/// as it comes, and cut as it was cut. Either way the credential the call sent (`key`: the
/// provider's key, or the base64 of its URL's userinfo), if it sent one, is hidden
/// (`key_hidden`).
fn relayed(resp: reqwest::Response, key: Option<String>) -> Response {
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = HeaderMap::new();
    for (name, value) in resp.headers() {
        if passed_on(name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    let events = headers.get(header::CONTENT_TYPE).is_some_and(|t| {
        t.to_str().is_ok_and(|t| {
            t.trim()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        })
    });
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    let bytes = resp.bytes_stream();
    let bytes: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>> = match key {
        Some(key) => Box::pin(key_hidden(bytes, key)),
        None => Box::pin(bytes),
    };
    let body = match events {
        true => {
            super::stream::unbuffered(&mut headers);
            Body::from_stream(whole_events(bytes))
        }
        false => Body::from_stream(bytes),
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// A relayed body with the provider's `key` shown as `***` wherever it appears, however the
/// chunks cut it: each chunk goes out but for a last few bytes that begin the key (at most
/// `key.len() - 1`), which are held for the next; an event's closing blank line is never held.
/// An upstream may echo the key it was sent (a proxy's "invalid key sk-...", as an error
/// status, in a 2xx, or in an event), and that key is the server's, not the client's. A body
/// that breaks ends with the break, after what was held.
fn key_hidden(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
    key: String,
) -> impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static {
    /// The body, what is held of it, and a break to pass on once that went out.
    type State<B> = (B, Vec<u8>, String, Option<reqwest::Error>);
    let start: State<_> = (body, Vec::new(), key, None);
    futures::stream::unfold(Some(start), |state| async move {
        let (mut body, mut held, key, broke) = state?;
        if let Some(e) = broke {
            return Some((Err(e), None));
        }
        match body.next().await {
            // The chunk, after what was held: it goes out less a tail that begins the key, as
            // it came (no copy) when nothing in it was replaced, as nearly always.
            Some(Ok(chunk)) => {
                let hay = match held.is_empty() {
                    true => chunk,
                    false => {
                        held.extend_from_slice(&chunk);
                        Bytes::from(held)
                    }
                };
                let (out, upto) = replaced(&hay, key.as_bytes(), b"***");
                let out = match out {
                    Cow::Borrowed(_) => hay.slice(..upto),
                    Cow::Owned(out) => Bytes::from(out),
                };
                let rest = hay[upto..].to_vec();
                Some((Ok(out), Some((body, rest, key, None))))
            }
            // What was held goes out before the break: it only begins the key, and may end an
            // event that `whole_events` would otherwise drop as unfinished.
            Some(Err(e)) if !held.is_empty() => Some((
                Ok(Bytes::from(held)),
                Some((body, Vec::new(), key, Some(e))),
            )),
            Some(Err(e)) => Some((Err(e), None)),
            None => (!held.is_empty()).then(|| (Ok(Bytes::from(held)), None)),
        }
    })
}

/// `hay` with every `needle` in it replaced by `with`, up to its last bytes that begin
/// `needle` (which the next bytes may complete); and where that part ends. Borrowed when
/// nothing was replaced. Bytes: a body need not be UTF-8, nor a chunk end on a character's end.
fn replaced<'a>(hay: &'a [u8], needle: &[u8], with: &[u8]) -> (Cow<'a, [u8]>, usize) {
    if needle.is_empty() {
        return (Cow::Borrowed(hay), hay.len());
    }
    let mut out: Option<Vec<u8>> = None;
    // Where the bytes not yet passed on start.
    let mut at = 0;
    while let Some(found) = hay[at..].windows(needle.len()).position(|w| w == needle) {
        let copy = out.get_or_insert_with(|| Vec::with_capacity(hay.len()));
        copy.extend_from_slice(&hay[at..at + found]);
        copy.extend_from_slice(with);
        at += found + needle.len();
    }
    // Of the last bytes, fewer than the needle, those that begin it are held.
    let mut upto = at.max(hay.len().saturating_sub(needle.len() - 1));
    while upto < hay.len() && !needle.starts_with(&hay[upto..]) {
        upto += 1;
    }
    match out {
        None => (Cow::Borrowed(&hay[..upto]), upto),
        Some(mut copy) => {
            copy.extend_from_slice(&hay[at..upto]);
            (Cow::Owned(copy), upto)
        }
    }
}

/// The most held back waiting for an event's end: past it (an upstream that sends no blank
/// lines), what is held goes out as it is.
const MAX_HELD: usize = 1 << 20;

/// An event stream's bytes held back until the event they belong to is whole. Lines end with
/// CRLF, LF or CR, as the SSE format allows; a blank line ends an event. The bytes already
/// scanned are not scanned again.
#[derive(Default)]
struct Events {
    held: Vec<u8>,
    /// How far `held` is scanned; a CR last is left unscanned (it may begin a CRLF).
    scanned: usize,
    /// Whether the last scanned byte ended a line (so that a line end next is a blank line).
    after_line_end: bool,
    /// Whether bytes of an unfinished event went out (past `MAX_HELD`).
    mid_event: bool,
}

impl Events {
    /// Take `bytes`; what can go out now: the events made whole, or everything held once past
    /// `MAX_HELD`.
    fn push(&mut self, bytes: &[u8]) -> Option<Bytes> {
        self.held.extend_from_slice(bytes);
        let mut end = None;
        let buf = &self.held;
        let mut i = self.scanned;
        while i < buf.len() {
            let line_end = match buf[i] {
                b'\n' => 1,
                b'\r' if i + 1 == buf.len() => break,
                b'\r' if buf[i + 1] == b'\n' => 2,
                b'\r' => 1,
                _ => 0,
            };
            i += line_end.max(1);
            if line_end > 0 && self.after_line_end {
                end = Some(i);
            }
            self.after_line_end = line_end > 0;
        }
        self.scanned = i;
        match end {
            Some(_) => self.mid_event = false,
            None if self.held.len() > MAX_HELD => self.mid_event = true,
            None => return None,
        }
        // Past `MAX_HELD`, all that is scanned: a CR last stays, to be read with what follows.
        let end = end.unwrap_or(self.scanned);
        let rest = self.held.split_off(end);
        self.scanned -= end;
        Some(Bytes::from(std::mem::replace(&mut self.held, rest)))
    }

    /// The upstream ended cleanly: what is left, as it is.
    fn end(self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| Bytes::from(self.held))
    }

    /// The upstream was cut: the unfinished event is dropped, and the stream ends with the
    /// error (the URL left out: it may carry the provider's credentials), then `[DONE]`, after
    /// a blank line that ends an event already partly sent.
    fn cut(self, e: reqwest::Error) -> Bytes {
        let e = e.without_url();
        tracing::warn!(error = %e, "a relayed event stream was cut");
        let error = json!({"error": {
            "code": "upstream_cut",
            "message": format!("the upstream's answer was cut: {e}"),
            "type": "server_error",
        }});
        let close = if self.mid_event { "\n\n" } else { "" };
        Bytes::from(format!("{close}data: {error}\n\ndata: [DONE]\n\n"))
    }
}

/// `upstream`'s bytes, an event at a time (see [`Events`]).
fn whole_events(
    upstream: impl Stream<Item = reqwest::Result<Bytes>> + Send + Unpin + 'static,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    futures::stream::unfold(Some((upstream, Events::default())), |state| async move {
        let (mut upstream, mut events) = state?;
        loop {
            match upstream.next().await {
                Some(Ok(bytes)) => {
                    if let Some(out) = events.push(&bytes) {
                        return Some((Ok(out), Some((upstream, events))));
                    }
                }
                None => return events.end().map(|out| (Ok(out), None)),
                Some(Err(e)) => return Some((Ok(events.cut(e)), None)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::upstream::test_server::{self, Then, answering, trickling, upstream_at};

    async fn relay_from(base: &str) -> (StatusCode, HeaderMap, String) {
        relay_with_key(base, None).await
    }

    async fn relay_with_key(base: &str, key: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let up = upstream_at(&format!("{base}/v1"), key);
        let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
        // The key the provider was configured with, as `relay` gives it.
        let (answer, key) = up.relay("m", body, 1).await.unwrap();
        let out = relayed(answer, key.map(str::to_string));
        let (status, headers) = (out.status(), out.headers().clone());
        let bytes = axum::body::to_bytes(out.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    // What the SDKs act on passes on: a 429's `Retry-After` (else they retry at once, into the
    // same limit), the rate-limit headers, the request id; the upstream's cookies do not.
    #[tokio::test]
    async fn a_relayed_answer_keeps_the_headers_a_client_acts_on() {
        let answer = "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
                      retry-after: 7\r\nx-ratelimit-remaining-requests: 0\r\n\
                      x-request-id: req_1\r\nset-cookie: session=secret\r\n\
                      content-length: 2\r\n\r\n{}";
        let (base, _) = answering(answer, Then::Close).await;
        let (status, headers, text) = relay_from(&base).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["retry-after"], "7");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        assert_eq!(headers["x-request-id"], "req_1");
        assert_eq!(headers["content-type"], "application/json");
        assert!(!headers.contains_key("set-cookie"), "{headers:?}");
        assert_eq!(text, "{}");
    }

    // An upstream's error that echoes the key it was sent reaches the gateway's client with
    // the key hidden: it is the server's key. Before, the body was passed on as it came.
    #[tokio::test]
    async fn a_relayed_error_never_shows_the_servers_key() {
        let key = "sk-live-0123456789abcdef";
        let body = format!(r#"{{"error": {{"message": "Incorrect API key provided: {key}."}}}}"#);
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, _) = answering(answer, Then::Close).await;
        let (status, headers, text) = relay_with_key(&base, Some(key)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(
            text,
            r#"{"error": {"message": "Incorrect API key provided: ***."}}"#
        );
    }

    // A placeholder key (`x`, `EMPTY`: what a local server that takes any key is given) is not
    // hidden: the answer passes as it came. Before, every `x` of it became `***`.
    #[tokio::test]
    async fn a_placeholder_key_leaves_a_relayed_answer_whole() {
        let body = test_server::completion("extra text: x EMPTY sk-xxxx", "{}");
        for key in ["x", "EMPTY", "sk-xxxx"] {
            let (base, _) = answering(test_server::answer("200 OK", &body), Then::Close).await;
            let (status, _, text) = relay_with_key(&base, Some(key)).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(text, body, "{key}");
        }
    }

    // A refusal of the server's credentials is answered as ours (see `passthrough`), and the
    // key an upstream echoed in it stays hidden there too.
    #[tokio::test]
    async fn a_refusal_answered_as_ours_never_shows_the_servers_key() {
        let key = "sk-live-0123456789abcdef";
        let body = format!(r#"{{"error": {{"message": "Incorrect API key provided: {key}."}}}}"#);
        let answer = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, _) = answering(answer, Then::Close).await;
        let up = upstream_at(&format!("{base}/v1"), Some(key));
        let (answer, sent) = up.relay("m", json!({"messages": []}), 1).await.unwrap();
        assert!(UpstreamError::status_refuses_our_credentials(
            answer.status().as_u16()
        ));
        let e = ApiError::upstream(up.relayed_error(answer, sent).await);
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert_eq!(e.code, "upstream_auth");
        assert!(
            e.message.contains("Incorrect API key provided: ***"),
            "{}",
            e.message
        );
        assert!(!e.message.contains(key), "{}", e.message);
    }

    // A provider whose base URL carries `user:password@` sends them as Basic auth: an upstream
    // echoing that header shows them hidden too. Before, only a key was.
    #[tokio::test]
    async fn a_relayed_answer_never_shows_the_servers_basic_credentials() {
        // `user:s@cret`, as sent.
        let token = "dXNlcjpzQGNyZXQ=";
        let body = format!(r#"{{"error": {{"message": "denied: Authorization: Basic {token}"}}}}"#);
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, _) = answering(answer, Then::Close).await;
        let base = base.replacen("http://", "http://user:s%40cret@", 1);
        let (status, _, text) = relay_from(&base).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            text,
            r#"{"error": {"message": "denied: Authorization: Basic ***"}}"#
        );
    }

    // The key is hidden however the chunks cut it (here one byte at a time, and across a chunk
    // that ends the body), in an answer of any status; a key's prefix at the very end is not
    // the key, and goes out as it came.
    #[tokio::test]
    async fn a_key_cut_across_chunks_is_hidden_whole() {
        let key = "sk-live-0123";
        let hidden = |chunks: Vec<&'static str>| async move {
            let chunks = chunks.into_iter().map(|c| Ok(Bytes::from(c)));
            let out: Vec<reqwest::Result<Bytes>> =
                key_hidden(futures::stream::iter(chunks), key.to_string())
                    .collect()
                    .await;
            let bytes: Vec<u8> = out.into_iter().flat_map(|c| c.unwrap()).collect();
            String::from_utf8(bytes).unwrap()
        };
        let text = "data: {\"error\": \"bad key sk-live-0123\"}\n\nsk-live-0123";
        let one_by_one = text.split_inclusive(|_| true).collect();
        assert_eq!(
            hidden(one_by_one).await,
            "data: {\"error\": \"bad key ***\"}\n\n***"
        );
        assert_eq!(
            hidden(vec!["a sk-live", "-0123 b sk-li"]).await,
            "a *** b sk-li"
        );
        let replaced = |hay: &'static [u8], needle: &[u8], with: &[u8]| {
            let (out, upto) = replaced(hay, needle, with);
            (out.into_owned(), upto)
        };
        assert_eq!(replaced(b"akbkk", b"k", b"**"), (b"a**b****".to_vec(), 5));
        assert_eq!(replaced(b"abkk", b"kk", b"*"), (b"ab*".to_vec(), 4));
        assert_eq!(replaced(b"abck", b"kk", b"*"), (b"abc".to_vec(), 3));
        assert_eq!(replaced(b"aaa", b"aa", b"*"), (b"*".to_vec(), 2));
        assert_eq!(replaced(b"xk-k-kx", b"k-k", b"*"), (b"x*-kx".to_vec(), 7));
        // Only a tail that begins the key is held: an event's end goes out at once.
        let event = b"data: {}\n\n";
        assert_eq!(
            replaced(event, b"sk-live", b"*"),
            (event.to_vec(), event.len())
        );
        assert_eq!(replaced(b"x sk-l", b"sk-live", b"*"), (b"x ".to_vec(), 2));
    }

    // An event stream whose upstream goes silent past the timeout ends as the SDKs read a
    // failure: an error event, then `[DONE]`, after the events that came.
    #[tokio::test]
    async fn a_relayed_stream_cut_part_way_ends_with_an_error_event() {
        let base = trickling(1, Duration::from_millis(10), Then::Hold).await;
        let (status, _, text) = relay_from(&base).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.starts_with("data: 0\n\n"), "{text}");
        assert!(text.contains("\"code\":\"upstream_cut\""), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("127.0.0.1"), "the URL stays out: {text}");
    }

    // Cut inside an event (the read ended half way through it): the half event is dropped, so
    // the error event that ends the stream is one the SDKs can parse.
    #[tokio::test]
    async fn a_relayed_stream_cut_inside_an_event_drops_the_half_event() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      transfer-encoding: chunked\r\n\r\n\
                      1c\r\ndata: {\"a\": 1}\n\ndata: {\"choi\r\n";
        let (base, _) = answering(answer, Then::Hold).await;
        let (status, headers, text) = relay_from(&base).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-accel-buffering"], "no");
        assert!(
            text.starts_with("data: {\"a\": 1}\n\ndata: {\"error\""),
            "{text}"
        );
        assert!(!text.contains("choi"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    // An upstream that sends no blank line is not held back past `MAX_HELD`: what came goes out.
    #[tokio::test]
    async fn a_stream_without_event_ends_is_not_held_back_for_good() {
        let line = format!("data: {}", "x".repeat(MAX_HELD + 100));
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{line}\r\n",
            line.len()
        );
        let (base, _) = answering(head, Then::Hold).await;
        let (_, _, text) = relay_from(&base).await;
        assert!(text.starts_with(&line), "{}", &text[..100]);
        // The event partly sent is ended, so that the error is an event of its own.
        let tail = &text[line.len()..];
        assert!(tail.starts_with("\n\ndata: {\"error\""), "{tail}");
        assert!(tail.ends_with("data: [DONE]\n\n"), "{tail}");
    }

    #[test]
    fn an_event_goes_out_after_its_blank_line_whatever_its_line_ends() {
        // Each case: the reads, then what goes out after each.
        type Case<'a> = (&'a [&'a [u8]], &'a [Option<&'a [u8]>]);
        let cases: [Case; 7] = [
            (&[b"data: 1\n\ndata: 2"], &[Some(b"data: 1\n\n")]),
            (
                &[b"data: 1\r\n\r\ndata: 2\n\n"],
                &[Some(b"data: 1\r\n\r\ndata: 2\n\n")],
            ),
            (&[b"data: 1\r\rdata: 2"], &[Some(b"data: 1\r\r")]),
            (&[b"data: 1\n\r\nx"], &[Some(b"data: 1\n\r\n")]),
            (
                &[b"data: 1\r\n", b"\ndata"],
                &[None, Some(b"data: 1\r\n\n")],
            ),
            // A CR last may begin a CRLF: it ends nothing until the next read says.
            (
                &[b"data: 1\r\n\r", b"\nx"],
                &[None, Some(b"data: 1\r\n\r\n")],
            ),
            (
                &[b"data: 1\n", b"\n", b"data: 2\n"],
                &[None, Some(b"data: 1\n\n"), None],
            ),
        ];
        for (reads, outs) in cases {
            let mut events = Events::default();
            for (read, out) in reads.iter().zip(outs) {
                let sent = events.push(read);
                assert_eq!(sent.as_deref(), *out, "{reads:?}");
            }
        }
    }

    // A read that takes what is held past `MAX_HELD` and ends with a CR (the first half of a
    // CRLF) sends all but that CR, which then ends the event with what follows.
    #[test]
    fn a_flush_past_the_limit_keeps_a_cr_that_may_begin_a_crlf() {
        let mut events = Events::default();
        let line = format!("data: {}\r", "x".repeat(MAX_HELD));
        let sent = events.push(line.as_bytes()).expect("past the limit, sent");
        assert_eq!(sent.len(), line.len() - 1);
        assert_eq!(events.push(b"\n\r\n").as_deref(), Some(&b"\r\n\r\n"[..]));
        assert_eq!(
            events.push(b"data: 2\n\n").as_deref(),
            Some(&b"data: 2\n\n"[..])
        );
    }
}
