//! Tests of a Postgres server that vanishes without a word (a crashed host, a partition, a
//! NAT's idle timeout): its connections stay open, and a statement sent on one is never answered
//! and never fails. A proxy between the store and the server stops passing bytes, in both
//! directions, on every connection it holds, and closes none; new connections pass as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::postgres::PgStore;
use super::{JobEvent, Store, StoreOptions, queued_job};
use crate::testing::ScratchDatabase;

/// A TCP proxy to the test database whose open connections can be made silent, and which can
/// refuse new ones (the server unreachable).
struct Silencer {
    /// The URL of the database through the proxy.
    url: String,
    /// One flag per connection passed so far: set, it passes nothing more.
    silenced: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>>,
    /// Set: a new connection is closed at once.
    refusing: Arc<AtomicBool>,
    /// Connections tried so far, refused ones included.
    tried: Arc<AtomicUsize>,
}

impl Silencer {
    async fn to(database: &ScratchDatabase) -> Silencer {
        let mut url = reqwest::Url::parse(&database.url).expect("database url");
        let target = format!(
            "{}:{}",
            url.host_str().expect("host"),
            url.port().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(listener.local_addr().unwrap().port()))
            .unwrap();
        let silenced: Arc<std::sync::Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let flags = silenced.clone();
        let refusing = Arc::new(AtomicBool::new(false));
        let tried = Arc::new(AtomicUsize::new(0));
        let (refuse, count) = (refusing.clone(), tried.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if refuse.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let flag = Arc::new(AtomicBool::new(false));
                flags.lock().unwrap().push(flag.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pass(client_read, server_write, flag.clone()));
                tokio::spawn(pass(server_read, client_write, flag));
            }
        });
        Silencer {
            url: url.to_string(),
            silenced,
            refusing,
            tried,
        }
    }

    /// Every connection open now passes nothing more, and stays open.
    fn silence(&self) {
        for flag in self.silenced.lock().unwrap().iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Copy `from` to `to` until `silenced`; from then on, read and drop.
async fn pass(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    silenced: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
        if !silenced.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn store_through(
    prefix: &str,
    statement_timeout: Option<Duration>,
) -> Option<(ScratchDatabase, Silencer, PgStore)> {
    let options = StoreOptions {
        statement_timeout,
        ..StoreOptions::default()
    };
    store_with(prefix, options).await
}

/// A store allowed the fewest connections (`MIN_CONNECTIONS`: 2 in its pool, 1 listening), with
/// this statement timeout (a statement unanswered 5 s past it is given up).
async fn smallest_store(
    prefix: &str,
    statement_timeout: Duration,
) -> Option<(ScratchDatabase, Silencer, PgStore)> {
    let options = StoreOptions {
        max_connections: StoreOptions::MIN_CONNECTIONS,
        statement_timeout: Some(statement_timeout),
    };
    store_with(prefix, options).await
}

async fn store_with(
    prefix: &str,
    options: StoreOptions,
) -> Option<(ScratchDatabase, Silencer, PgStore)> {
    let database = ScratchDatabase::from_env(prefix).await?;
    let silencer = Silencer::to(&database).await;
    let store = PgStore::connect(&silencer.url, options).await.unwrap();
    store.migrate().await.unwrap();
    Some((database, silencer, store))
}

// The batch committer's statement goes unanswered: it fails a little past the statement
// timeout (1 s + the 5 s margin), as a broken connection would, instead of holding every
// enqueue, checkpoint and outcome of the process for good; the store then works again on new
// connections.
#[tokio::test]
async fn a_batch_the_server_never_answers_fails_and_the_store_goes_on() {
    let Some((database, silencer, store)) =
        store_through("fusion_half_open_batch", Some(Duration::from_secs(1))).await
    else {
        return;
    };
    store.enqueue(queued_job(1), None).await.unwrap();
    // The statement is held at the server by a lock (on a connection of the test's own, not
    // through the proxy) until its connection has gone silent: sent on a working connection,
    // its answer never comes back.
    let mut lock = JobsLocked::by(&database).await;
    let write = tokio::spawn(async move {
        let write = store.enqueue(queued_job(2), None);
        let answer = tokio::time::timeout(Duration::from_secs(30), write).await;
        (store, answer)
    });
    lock.waited_on_by(1).await;
    silencer.silence();
    lock.release().await;
    let (store, answer) = write.await.unwrap();
    let failed = answer
        .expect("the write must fail, not wait for good")
        .unwrap_err();
    assert!(
        failed.to_string().contains("no answer from Postgres"),
        "{failed}"
    );
    let recovered = async {
        loop {
            if store.enqueue(queued_job(3), None).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), recovered)
        .await
        .expect("writes work again on new connections");
}

// A read, a claim and a heartbeat go unanswered (held at the server by a lock until their
// connections went silent): each fails within its bound, as a broken connection would, instead
// of waiting as long as TCP takes to give up (many minutes) and then, its connection dropped
// mid-statement, as long again in sqlx's ping on the way back to the pool. The bound: the
// statement timeout (1 s) + 5 s. The store then works again on new connections.
#[tokio::test]
async fn reads_claims_and_heartbeats_the_server_never_answers_fail_in_time() {
    let Some((database, silencer, store)) =
        store_through("fusion_half_open_reads", Some(Duration::from_secs(1))).await
    else {
        return;
    };
    let super::Enqueued::Created(job) = store.enqueue(queued_job(1), None).await.unwrap() else {
        panic!("a new job");
    };
    let id = job.id;
    let mut lock = JobsLocked::by(&database).await;
    let store = Arc::new(store);
    let timed = |call: futures::future::BoxFuture<'static, Result<String, String>>| {
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(30), call).await;
            (answer, started.elapsed())
        })
    };
    let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
    let read = timed(Box::pin(async move {
        s1.get_job(id)
            .await
            .map(|j| format!("{j:?}"))
            .map_err(|e| e.to_string())
    }));
    let claim = timed(Box::pin(async move {
        let claimed = s2.claim("w", 1, 2, Duration::from_secs(30)).await;
        claimed
            .map(|c| format!("{} claimed", c.len()))
            .map_err(|e| e.to_string())
    }));
    let beat = timed(Box::pin(async move {
        let held = s3
            .heartbeat("w", &[(id, 1)], 3, Duration::from_secs(6))
            .await;
        held.map(|h| format!("{} held", h.len()))
            .map_err(|e| e.to_string())
    }));
    lock.waited_on_by(3).await;
    silencer.silence();
    lock.release().await;
    for (what, call, bound) in [
        ("read", read, Duration::from_secs(6)),
        ("claim", claim, Duration::from_secs(6)),
        ("heartbeat", beat, Duration::from_secs(6)),
    ] {
        let (answer, took) = call.await.unwrap();
        let failed = answer
            .unwrap_or_else(|_| panic!("the {what} must fail, not wait for good"))
            .expect_err(what);
        assert!(
            failed.contains("no answer from Postgres"),
            "{what}: {failed}"
        );
        assert!(
            took >= bound && took < bound + Duration::from_secs(3),
            "{what}: {took:?}"
        );
    }
    let recovered = async {
        loop {
            if let Ok(Some(_)) = store.get_job(id).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), recovered)
        .await
        .expect("reads work again on new connections");
}

// A caller gives up on a read the server never answers (a request whose client left, `/readyz`'s
// own 2 s timeout): the read's connection keeps its place until the read's bound (6 s here),
// then is closed, not handed back to the pool through sqlx's ping, which would wait on it as
// long as TCP takes to give up. With 2 places in the pool, two such reads given up leave both
// free by then. Before, each held its place in that ping, and the next statements waited out
// the acquire timeout.
#[tokio::test]
async fn a_statement_its_caller_gave_up_on_takes_no_place_in_the_pool_for_long() {
    let Some((database, silencer, store)) =
        smallest_store("fusion_half_open_gave_up", Duration::from_secs(1)).await
    else {
        return;
    };
    let mut lock = JobsLocked::by(&database).await;
    let store = Arc::new(store);
    let reads = given_up_reads(&store, Duration::from_secs(2));
    lock.waited_on_by(2).await;
    silencer.silence();
    lock.release().await;
    for read in reads {
        assert!(read.await.unwrap().is_err(), "the caller gave up");
    }
    two_connections_at_once(&store).await;
}

// On a server that is there, a statement its caller gave up on keeps its connection's place in
// the pool until the statement ends (here: behind a lock, until the lock is released), then the
// connection goes back to the pool. Closed at once instead, its backend went on waiting at the
// server while the pool opened another: callers giving up again and again opened the server's
// connections up.
#[tokio::test]
async fn a_statement_its_caller_gave_up_on_keeps_its_place_until_it_ends() {
    let Some((database, _silencer, store)) =
        smallest_store("fusion_gave_up_live", Duration::from_secs(30)).await
    else {
        return;
    };
    let mut lock = JobsLocked::by(&database).await;
    let store = Arc::new(store);
    let reads = given_up_reads(&store, Duration::from_millis(300));
    lock.waited_on_by(2).await;
    for read in reads {
        assert!(read.await.unwrap().is_err(), "the caller gave up");
    }
    let third = tokio::time::timeout(Duration::from_millis(300), store.pool().acquire()).await;
    assert!(
        third.is_err(),
        "a place was given up while its statement still ran"
    );
    assert_eq!(crate::testing::lock_waiters(&mut lock.0).await, 2);
    lock.release().await;
    two_connections_at_once(&store).await;
    assert_eq!(store.pool().size(), 2, "the pool opened other connections");
}

/// Two reads of `store`, spawned, each given up by its caller after `after`.
fn given_up_reads(
    store: &Arc<PgStore>,
    after: Duration,
) -> Vec<
    tokio::task::JoinHandle<
        Result<super::Result<Option<crate::job::Job>>, tokio::time::error::Elapsed>,
    >,
> {
    (0..2)
        .map(|_| {
            let store = store.clone();
            let read = async move { store.get_job(uuid::Uuid::now_v7()).await };
            tokio::spawn(tokio::time::timeout(after, read))
        })
        .collect()
}

/// `jobs` locked (`ACCESS EXCLUSIVE`, so reads wait too) by a transaction on a connection of the
/// test's own, not through the proxy: a statement sent through it is held at the server until
/// the lock is released, and if its connection went silent meanwhile its answer never comes.
struct JobsLocked(PgConnection);

impl JobsLocked {
    async fn by(database: &ScratchDatabase) -> JobsLocked {
        let mut conn = PgConnection::connect(&database.url).await.unwrap();
        sqlx::raw_sql("BEGIN; LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            .execute(&mut conn)
            .await
            .unwrap();
        JobsLocked(conn)
    }

    /// Wait until `n` statements wait on the lock: sent, so that a proxy silenced now never
    /// passes their answers.
    async fn waited_on_by(&mut self, n: i64) {
        for _ in 0..200 {
            if crate::testing::lock_waiters(&mut self.0).await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} statements did not come to wait on the lock");
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK").execute(&mut self.0).await.unwrap();
    }
}

/// Two connections of `store`'s pool at once, within 8 s (the acquire timeout is 10 s).
async fn two_connections_at_once(store: &PgStore) {
    let both = futures::future::try_join(store.pool().acquire(), store.pool().acquire());
    let (a, b) = tokio::time::timeout(Duration::from_secs(8), both)
        .await
        .expect("two connections at once, in time")
        .expect("two connections at once");
    drop((a, b));
}

// The listener's connection goes silent: after a quiet second (in tests) it is asked to answer,
// is not, and is replaced; the store says notifications may have been missed meanwhile, so that
// workers re-check their leases and waiters re-read their jobs. Before, it listened on the
// silent connection for good, and said nothing.
#[tokio::test]
async fn a_silent_listener_is_replaced_and_says_what_may_have_been_missed() {
    let Some((_database, silencer, store)) = store_through("fusion_half_open_listen", None).await
    else {
        return;
    };
    // Listening: a job queued by another connection is heard.
    store.enqueue(queued_job(1), None).await.unwrap();
    silence_until_listening_again(&silencer, &store).await;
}

/// Silence every connection open now, and wait until the store's listener has found its own
/// out, listens on another and says what may have been missed meanwhile.
async fn silence_until_listening_again(silencer: &Silencer, store: &PgStore) {
    let mut events = store.events();
    silencer.silence();
    let missed = async {
        loop {
            if let Ok(JobEvent::Missed) = events.recv().await {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), missed)
        .await
        .expect("the silent listener must be replaced, and say so");
}

// The listener's connection goes silent and is replaced: the replaced one, which sqlx keeps
// until TCP gives it up (it sends `UNLISTEN` on it as it drops), takes no place among the
// store's own connections. With 3 allowed, 2 serve statements at once before and after. Before,
// the listener took its connections from the store's pool: after one replacement the dead one
// and the new one held 2 of its 3 places (for ~15 minutes), and a second statement at once
// waited out the acquire timeout.
#[tokio::test]
async fn a_replaced_listener_takes_no_place_among_the_stores_connections() {
    let Some((_database, silencer, store)) =
        smallest_store("fusion_half_open_places", Duration::from_secs(30)).await
    else {
        return;
    };
    silence_until_listening_again(&silencer, &store).await;
    // Each on a connection of its own (the silent ones pooled before are pinged, found out and
    // replaced first: within the 1 s ping bound of tests, each).
    two_connections_at_once(&store).await;
}

// A store dropped while its listener cannot connect (the server unreachable: app.rs drops the
// store and tries again when a migration fails at start-up) stops trying. Before, its LISTEN
// task tried again every few seconds for the life of the process, each time with a warning.
#[tokio::test]
async fn a_store_dropped_while_its_listener_reconnects_stops_trying() {
    // This test's thread (its runtime's only one, which runs the listener task too).
    let (logged, _logs) = crate::testing::capture_logs();
    let warned = || logged.text().matches("LISTEN failed").count();
    let Some((_database, silencer, store)) = store_through("fusion_half_open_drop", None).await
    else {
        return;
    };
    silencer.refusing.store(true, Ordering::SeqCst);
    silencer.silence();
    // The silent listener is found out (after 1 s of quiet and a 1 s ping, in tests) and tries
    // to connect again, in vain.
    let retried = async {
        while warned() == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), retried)
        .await
        .expect("the silent listener tries to connect again");
    drop(store);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (after_drop, tries) = (warned(), silencer.tried.load(Ordering::SeqCst));
    // Past the longest backoff between tries (5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        warned(),
        after_drop,
        "the dropped store's listener still tries"
    );
    assert_eq!(silencer.tried.load(Ordering::SeqCst), tries);
}
