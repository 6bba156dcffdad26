//! A scripted fake OpenAI-compatible upstream (an axum app on 127.0.0.1:0). Models are scripted
//! by name, per kind of call (panel, analysis, final): latency, HTTP failures, hangs, bad JSON.
//! Every request is counted so tests can assert exactly how often upstream was called.
//! `GET /_fake/stats` returns the same counts as JSON, for a fake run in another process (the
//! benchmark harness in `benches/bench/` runs it that way).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

/// Which step a request belongs to, told from its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Panel,
    Analysis,
    Final,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Panel => "panel",
            Kind::Analysis => "analysis",
            Kind::Final => "final",
        }
    }

    #[allow(dead_code)] // used by the benchmark harness (benches/bench/)
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "panel" => Some(Kind::Panel),
            "analysis" => Some(Kind::Analysis),
            "final" => Some(Kind::Final),
            _ => None,
        }
    }
}

/// What the fake answers to one call.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The default answer for the kind (panel text, a valid analysis, a final answer).
    Ok,
    /// This exact content.
    Text(String),
    /// This content, cut at the token limit (`finish_reason: "length"`).
    Cut(String),
    /// Wait, then answer as the inner reply.
    Delay(u64, Box<Reply>),
    /// An HTTP error status with an OpenAI-style body.
    Status(u16),
    /// `200 OK` with exactly this body (JSON or not), and an `x-request-id` of `req_fake_raw`.
    RawOk(&'static str),
    /// `200 OK` with this body as `text/html`: a web page where an API was expected.
    Page(&'static str),
    /// `307 Temporary Redirect` back to the same endpoint (a client that follows it calls again).
    Redirect,
    /// 429 with `Retry-After: N` seconds.
    RateLimited(u64),
    /// Never answer.
    Hang,
    /// Start a 200 answer, then reset the connection mid-body.
    Truncated,
    /// A call of the named function tool with these JSON arguments.
    ToolCall(String, Value),
    /// Calls of these function tools, in parallel (`call_1`, `call_2`, ...).
    ToolCalls(Vec<(String, Value)>),
    /// As OpenAI's reasoning models answer: `400` naming `temperature` to a call that sets
    /// one, the default answer to one that does not.
    RefusesTemperature,
    /// As OpenRouter's moderation refuses an input: `403` with the reasons in the metadata.
    Flagged,
    /// As a model with a context of this many characters answers: OpenAI's `400
    /// context_length_exceeded` to a call whose messages are longer, the default answer to
    /// one that fits.
    ContextOf(usize),
}

pub const VALID_ANALYSIS: &str = r#"{"consensus":["the sky is blue"],"contradictions":[{"topic":"why","stances":[{"model":"m1","stance":"scattering"},{"model":"m2","stance":"reflection"}]}],"partial_coverage":[{"models":["m1"],"point":"sunsets"}],"unique_insights":[{"model":"m1","insight":"Rayleigh"}],"blind_spots":["other planets"]}"#;

#[derive(Default)]
struct FakeState {
    /// Replies in order per (model, kind); the last one repeats.
    scripts: HashMap<(String, Kind), Vec<Reply>>,
    /// Calls received per (model, kind), in order.
    calls: HashMap<(String, Kind), u32>,
    /// Calls answered with 200 per (model, kind).
    ok: HashMap<(String, Kind), u32>,
    /// Request body bytes received per (model, kind), as their `content-length` says.
    bytes: HashMap<(String, Kind), u64>,
    /// The bodies received, in order.
    bodies: Vec<Value>,
    /// When each call arrived (unix ms), per (model, kind).
    starts: HashMap<(String, Kind), Vec<i64>>,
    /// The reply of models with no script.
    default: Option<Reply>,
    /// Calls whose client went away before the answer, per (model, kind).
    aborted: HashMap<(String, Kind), u32>,
    /// Calls that carried the `x-fusion-depth` recursion-guard header.
    with_depth_header: u32,
    /// Keep no request bodies (long load runs would hold every one of them).
    skip_bodies: bool,
}

/// Counts a call as aborted if its handler is dropped before it answered (the client closed
/// the connection).
struct AbortGuard {
    state: Arc<Mutex<FakeState>>,
    key: Option<(String, Kind)>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            *self.state.lock().unwrap().aborted.entry(key).or_default() += 1;
        }
    }
}

#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        FakeUpstream::start_on("127.0.0.1:0").await
    }

    /// Listen on `addr`; with port 0 a free port is picked, and the `addr` field tells which.
    pub async fn start_on(addr: &str) -> FakeUpstream {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/_fake/stats", get(stats))
            // As a provider takes a long conversation (axum's default is 2 MiB).
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state.clone());
        // A deep accept queue (the kernel caps it at somaxconn): a server starting hundreds of
        // jobs at once opens as many connections in a burst, and a dropped SYN is retried only
        // after a second.
        let addr: std::net::SocketAddr = addr.parse().expect("an ip:port address");
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeUpstream { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The model `outer` calls the fusion tool once ("Is the sky blue?"), then replies.
    pub fn outer_calls_fusion_once(&self) {
        self.script(
            "outer",
            Kind::Panel,
            vec![
                Reply::ToolCall("fusion".into(), json!({"prompt": "Is the sky blue?"})),
                Reply::Text("outer model's reply".into()),
            ],
        );
    }

    /// Script the replies `model` gives to calls of `kind`.
    pub fn script(&self, model: &str, kind: Kind, replies: Vec<Reply>) {
        self.state
            .lock()
            .unwrap()
            .scripts
            .insert((model.to_string(), kind), replies);
    }

    /// The reply every unscripted model gives.
    pub fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    /// Arrival times (unix ms) of the calls to `model` of `kind`.
    pub fn starts(&self, model: &str, kind: Kind) -> Vec<i64> {
        let s = self.state.lock().unwrap();
        s.starts
            .get(&(model.to_string(), kind))
            .cloned()
            .unwrap_or_default()
    }

    pub fn calls(&self, model: &str, kind: Kind) -> u32 {
        let s = self.state.lock().unwrap();
        *s.calls.get(&(model.to_string(), kind)).unwrap_or(&0)
    }

    pub fn ok_calls(&self, model: &str, kind: Kind) -> u32 {
        let s = self.state.lock().unwrap();
        *s.ok.get(&(model.to_string(), kind)).unwrap_or(&0)
    }

    /// Calls to `model` of `kind` that the client abandoned before the answer.
    pub fn aborted(&self, model: &str, kind: Kind) -> u32 {
        let s = self.state.lock().unwrap();
        *s.aborted.get(&(model.to_string(), kind)).unwrap_or(&0)
    }

    /// Calls that carried the `x-fusion-depth` header.
    pub fn calls_with_depth_header(&self) -> u32 {
        self.state.lock().unwrap().with_depth_header
    }

    pub fn total_calls(&self) -> u32 {
        self.state.lock().unwrap().calls.values().sum()
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.state.lock().unwrap().bodies.clone()
    }

    /// The bodies of the requests to `model`, in order.
    pub fn bodies_to(&self, model: &str) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.bodies
            .iter()
            .filter(|b| b["model"] == model)
            .cloned()
            .collect()
    }

    /// Stop (or resume) keeping request bodies; `bodies()` then returns only those kept.
    #[allow(dead_code)] // used by the benchmark harness (benches/bench/)
    pub fn record_bodies(&self, on: bool) {
        self.state.lock().unwrap().skip_bodies = !on;
    }
}

/// `{"total": N, "ok": N, "aborted": N, "calls": [{"model", "kind", "calls", "ok", "aborted",
/// "bytes", "starts"?}]}`, one entry per (model, kind) that was called.
fn stats_of(s: &FakeState, starts: bool) -> Value {
    let mut keys: Vec<&(String, Kind)> = s.calls.keys().collect();
    keys.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
    let count = |m: &HashMap<(String, Kind), u32>, k: &(String, Kind)| *m.get(k).unwrap_or(&0);
    let calls: Vec<Value> = keys
        .into_iter()
        .map(|k| {
            let mut entry = json!({
                "model": k.0, "kind": k.1.as_str(), "calls": count(&s.calls, k),
                "ok": count(&s.ok, k), "aborted": count(&s.aborted, k),
                "bytes": s.bytes.get(k).copied().unwrap_or(0),
            });
            if starts {
                entry["starts"] = json!(s.starts.get(k).cloned().unwrap_or_default());
            }
            entry
        })
        .collect();
    json!({
        "total": s.calls.values().sum::<u32>(),
        "ok": s.ok.values().sum::<u32>(),
        "aborted": s.aborted.values().sum::<u32>(),
        "calls": calls,
    })
}

#[derive(Deserialize)]
struct StatsQuery {
    /// `?starts=true`: include every call's arrival time.
    #[serde(default)]
    starts: bool,
}

async fn stats(
    State(state): State<Arc<Mutex<FakeState>>>,
    Query(q): Query<StatsQuery>,
) -> Json<Value> {
    Json(stats_of(&state.lock().unwrap(), q.starts))
}

fn kind_of(body: &Value) -> Kind {
    let first = body
        .pointer("/messages/0/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if first.starts_with("You are an impartial analyst") {
        Kind::Analysis
    } else if first.starts_with("You have been provided with responses") {
        Kind::Final
    } else {
        Kind::Panel
    }
}

async fn completions(
    State(state): State<Arc<Mutex<FakeState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let kind = kind_of(&body);
    if headers.contains_key("x-fusion-depth") {
        state.lock().unwrap().with_depth_header += 1;
    }
    let reply = {
        let mut s = state.lock().unwrap();
        if !s.skip_bodies {
            s.bodies.push(body.clone());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        s.starts.entry((model.clone(), kind)).or_default().push(now);
        let length = headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        *s.bytes.entry((model.clone(), kind)).or_default() += length;
        let n = s.calls.entry((model.clone(), kind)).or_default();
        let index = *n as usize;
        *n += 1;
        match s.scripts.get(&(model.clone(), kind)) {
            Some(list) if !list.is_empty() => list[index.min(list.len() - 1)].clone(),
            _ => s.default.clone().unwrap_or(Reply::Ok),
        }
    };
    let mut guard = AbortGuard {
        state: state.clone(),
        key: Some((model.clone(), kind)),
    };
    let reply = match reply {
        Reply::RefusesTemperature if body.get("temperature").is_some() => {
            let error = json!({"error": {
                "message": "Unsupported value: 'temperature' does not support 0.0 with this \
                    model. Only the default (1) value is supported.",
                "type": "invalid_request_error", "param": "temperature",
                "code": "unsupported_value"}});
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
        Reply::RefusesTemperature => Reply::Ok,
        Reply::ContextOf(limit) if body["messages"].to_string().len() > limit => {
            let error = json!({"error": {
                "message": format!("This model's maximum context length is {limit} tokens. \
                    However, your messages resulted in {} tokens. Please reduce the length \
                    of the messages.", body["messages"].to_string().len()),
                "type": "invalid_request_error", "param": "messages",
                "code": "context_length_exceeded"}});
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
        Reply::ContextOf(_) => Reply::Ok,
        reply => reply,
    };
    let resp = respond(reply, &model, kind).await;
    guard.key = None;
    if resp.status() == StatusCode::OK {
        *state.lock().unwrap().ok.entry((model, kind)).or_default() += 1;
    }
    resp
}

async fn respond(reply: Reply, model: &str, kind: Kind) -> Response {
    let mut reply = reply;
    loop {
        match reply {
            Reply::Delay(ms, inner) => {
                timer::sleep(Duration::from_millis(ms)).await;
                reply = *inner;
            }
            Reply::Hang => std::future::pending::<()>().await,
            Reply::Truncated => {
                let chunks: Vec<Result<&'static str, std::io::Error>> = vec![
                    Ok(r#"{"id": "chatcmpl-fake", "choices": [{"message": {"content": "cut"#),
                    Err(std::io::Error::other("connection reset mid-body")),
                ];
                let body = axum::body::Body::from_stream(futures::stream::iter(chunks));
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap();
            }
            Reply::Flagged => {
                let body = json!({"error": {"code": 403,
                    "message": "Input flagged by moderation: violence",
                    "metadata": {"reasons": ["violence"], "flagged_input": "how to ...",
                                 "provider_name": "fake", "model_slug": model}}});
                return (StatusCode::FORBIDDEN, Json(body)).into_response();
            }
            Reply::Status(code) => {
                let status = StatusCode::from_u16(code).unwrap();
                let body = json!({"error": {"message": format!("scripted {code}"), "code": code}});
                return (status, Json(body)).into_response();
            }
            Reply::RawOk(body) => {
                let mut headers = HeaderMap::new();
                headers.insert("content-type", HeaderValue::from_static("application/json"));
                // As OpenAI's answers do: a relay passes it on.
                headers.insert("x-request-id", HeaderValue::from_static("req_fake_raw"));
                return (StatusCode::OK, headers, body).into_response();
            }
            Reply::Page(body) => {
                let mut headers = HeaderMap::new();
                let html = HeaderValue::from_static("text/html; charset=utf-8");
                headers.insert("content-type", html);
                return (StatusCode::OK, headers, body).into_response();
            }
            Reply::Redirect => {
                let mut headers = HeaderMap::new();
                headers.insert("location", HeaderValue::from_static("/v1/chat/completions"));
                return (StatusCode::TEMPORARY_REDIRECT, headers).into_response();
            }
            Reply::RateLimited(secs) => {
                let mut headers = HeaderMap::new();
                headers.insert("retry-after", HeaderValue::from(secs));
                let body = json!({"error": {"message": "slow down", "code": 429}});
                return (StatusCode::TOO_MANY_REQUESTS, headers, Json(body)).into_response();
            }
            Reply::Ok => {
                let text = match kind {
                    Kind::Panel => format!("panel answer from {model}"),
                    Kind::Analysis => VALID_ANALYSIS.to_string(),
                    Kind::Final => "the fused final answer".to_string(),
                };
                return completion(model, &text, "stop");
            }
            Reply::Text(text) => return completion(model, &text, "stop"),
            Reply::Cut(text) => return completion(model, &text, "length"),
            Reply::ToolCall(name, args) => return tool_calls(model, vec![(name, args)]),
            Reply::ToolCalls(calls) => return tool_calls(model, calls),
            // Told apart from `Ok` by the request, in `completions`.
            Reply::RefusesTemperature | Reply::ContextOf(_) => reply = Reply::Ok,
        }
    }
}

/// An assistant message calling these function tools.
fn tool_calls(model: &str, calls: Vec<(String, Value)>) -> Response {
    let calls: Vec<Value> = calls
        .into_iter()
        .enumerate()
        .map(|(i, (name, args))| {
            json!({"id": format!("call_{}", i + 1), "type": "function",
                   "function": {"name": name, "arguments": args.to_string()}})
        })
        .collect();
    let message = json!({"role": "assistant", "content": null, "tool_calls": calls});
    Json(json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.001},
    }))
    .into_response()
}

fn completion(model: &str, content: &str, finish_reason: &str) -> Response {
    Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": 0.001},
    }))
    .into_response()
}

/// Sleeps that end when scripted. tokio's timer counts in 1 ms ticks and its driver parks in
/// epoll's millisecond timeouts, so on a busy two-core machine a scripted 400 ms answer came
/// 1–3 ms late — lateness the overhead benchmark would count against the server. One thread
/// here waits (with futex timeouts, in nanoseconds) for the earliest deadline and wakes its call.
mod timer {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;
    use std::sync::mpsc::{self, RecvTimeoutError};
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use tokio::sync::oneshot;

    struct Wake {
        at: Instant,
        seq: u64,
        tx: oneshot::Sender<()>,
    }

    // The heap is a max-heap: the earliest deadline (then the first asked) compares greatest.
    impl Ord for Wake {
        fn cmp(&self, other: &Self) -> Ordering {
            (other.at, other.seq).cmp(&(self.at, self.seq))
        }
    }
    impl PartialOrd for Wake {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl PartialEq for Wake {
        fn eq(&self, other: &Self) -> bool {
            (self.at, self.seq) == (other.at, other.seq)
        }
    }
    impl Eq for Wake {}

    fn timer() -> &'static Mutex<mpsc::Sender<Wake>> {
        static TIMER: OnceLock<Mutex<mpsc::Sender<Wake>>> = OnceLock::new();
        TIMER.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name("fake-timer".into())
                .spawn(move || run(rx))
                .expect("start the fake's timer thread");
            Mutex::new(tx)
        })
    }

    fn run(rx: mpsc::Receiver<Wake>) {
        let mut due: BinaryHeap<Wake> = BinaryHeap::new();
        loop {
            let next = match due.peek() {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(w) => rx.recv_timeout(w.at.saturating_duration_since(Instant::now())),
            };
            match next {
                Ok(wake) => due.push(wake),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while due.peek().is_some_and(|w| w.at <= now) {
                // A call that was dropped meanwhile (its client hung up) has no one to wake.
                let _ = due.pop().map(|w| w.tx.send(()));
            }
        }
    }

    /// Wait `d`, ending within a fraction of a millisecond of the deadline.
    pub async fn sleep(d: Duration) {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (tx, rx) = oneshot::channel();
        let wake = Wake {
            at: Instant::now() + d,
            seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            tx,
        };
        if timer().lock().unwrap().send(wake).is_ok() {
            let _ = rx.await;
        } else {
            tokio::time::sleep(d).await;
        }
    }

    #[cfg(test)]
    #[tokio::test]
    async fn sleeps_end_in_deadline_order_and_never_early() {
        let start = Instant::now();
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ms in [60u64, 20, 40, 0] {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                assert!(start.elapsed() >= Duration::from_millis(ms));
                order.lock().unwrap().push(ms);
            }));
        }
        // A sleeper that gives up before its deadline does not stop the others.
        let dropped = tokio::time::timeout(Duration::from_millis(5), sleep(Duration::from_secs(1)));
        assert!(dropped.await.is_err());
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 20, 40, 60]);
    }
}
