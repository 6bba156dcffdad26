//! The HTTP server loop: axum's router served over HTTP/1.1 as `axum::serve` does, with a timer,
//! so that hyper's time limits apply. Without one (as `axum::serve` runs it) a client that
//! opens a connection and sends part of a request head, or nothing, holds it and its file
//! descriptor for ever, and enough of them exhaust what the upstream calls and the database pool
//! need as well.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a connection may take to send a request's head, counted from when the server is
/// ready to read one: a new connection's first request, or the next one on a kept-alive
/// connection (so an idle connection is closed after this long too, as nginx's
/// `keepalive_timeout` does). hyper's default; a body, once its head is in, is not bounded here.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serve `app` on `listener` until `shutdown` completes; then stop accepting, let every open
/// connection finish the request it is on (an idle one closes at once), and return once all
/// have closed.
pub async fn serve(
    mut listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // axum's `Listener` for a `TcpListener` retries failed accepts (pausing a second
        // after one that is not the connection's own fault: out of file descriptors, say).
        let (io, _) = tokio::select! {
            accepted = Listener::accept(&mut listener) => accepted,
            () = shutdown.as_mut() => break,
        };
        // An event stream's chunks, and keep-alive comments, are small writes that Nagle's
        // algorithm would hold back until the last one is acknowledged.
        if let Err(e) = io.set_nodelay(true) {
            tracing::trace!(error = %e, "could not set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    /// Everything the server sends on `stream` until it closes it, or `None` if it is still
    /// open after `within`.
    async fn until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
        let mut read = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut read))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&read).into_owned())
    }

    // A connection that sends part of a request's head, or nothing, is closed once the timeout
    // has passed; a whole request is answered, and its kept-alive connection closed when idle
    // that long. Served as `axum::serve` serves (no timer), the first stayed open for ever.
    #[tokio::test]
    async fn a_request_head_not_sent_in_time_closes_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let timeout = Duration::from_millis(300);
        let server = tokio::spawn(serve(listener, app, timeout, async move {
            stopped.cancelled().await
        }));

        let started = tokio::time::Instant::now();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        for stream in [&mut partial, &mut silent] {
            let sent = until_closed(stream, Duration::from_secs(5)).await;
            assert!(sent.is_some(), "still open after 5 s");
            assert!(started.elapsed() >= Duration::from_millis(250));
        }

        let mut whole = TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answered = until_closed(&mut whole, Duration::from_secs(5)).await;
        let answered = answered.expect("an idle kept-alive connection is closed too");
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
        assert!(answered.ends_with("ok"), "{answered}");
        stop.cancel();
        server.await.unwrap();
    }

    // At shutdown, a request under way is answered before the server returns, and an idle
    // kept-alive connection is closed at once (the header timeout, 10 s here, is not what
    // closes it). Before, the test checked only that the server returned, which it would as
    // well had connections not been watched at all.
    #[tokio::test]
    async fn at_shutdown_a_request_under_way_is_answered_and_idle_connections_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            "slow"
        };
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/slow", get(slow));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let timeout = Duration::from_secs(10);
        let mut server = tokio::spawn(serve(listener, app, timeout, async move {
            stopped.cancelled().await
        }));

        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        idle.read_exact(&mut head).await.unwrap();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();

        let closed = until_closed(&mut idle, Duration::from_millis(200)).await;
        assert!(
            closed.is_some(),
            "the idle connection stayed open at shutdown"
        );
        let early = tokio::time::timeout(Duration::from_millis(100), &mut server).await;
        assert!(
            early.is_err(),
            "the server returned with a request under way"
        );
        let answered = until_closed(&mut busy, Duration::from_secs(2)).await;
        let answered = answered.expect("the request under way is answered, then closed");
        assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
        assert!(answered.ends_with("slow"), "{answered}");
        tokio::time::timeout(Duration::from_millis(250), server)
            .await
            .expect("the server returns once that request is answered")
            .unwrap();
    }
}
