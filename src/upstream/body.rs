//! An answer's body read with a bound, chunk by chunk, by both clients: the whole of a 2xx up to
//! `MAX_ANSWER_BYTES` (past it the call fails for good), only the start of anything else.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{ErrorKind, UpstreamError};

/// The most of a 2xx answer's body that is read: 16 MiB. The bulk of a completion is its text,
/// and the longest answer any current model writes, 128 K tokens, is ~0.5 MB of it, ~3 MB if
/// every character came as a JSON `\uXXXX` escape, twice that with as much reasoning text beside
/// it. An answer past this is not a chat completion (a wrong base URL, a stream that was not
/// asked for) and would otherwise be held whole in memory, for every call in flight.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// How much of an error's body is kept: its message is the start of it (`upstream_message`
/// shows 300 characters of a body that is not an OpenAI-style error). The rest is not read.
pub const ERROR_BODY_KEPT: usize = 8 << 10;

/// The longest an error's body is waited for, once its head came (less when the call's own
/// timeout is short: half of it).
const ERROR_BODY_WAIT: Duration = Duration::from_secs(5);

/// The most room reserved for a body before any of it has come: an announced length is a
/// promise, and an upstream that announces 16 MiB and then stalls would otherwise hold that
/// much per call for the whole call's timeout. Past it the buffer grows as bytes arrive.
const RESERVED_BEFORE_READ: usize = 64 << 10;

/// How long an error's body is waited for on a call bounded by `timeout`.
pub(super) fn error_body_wait(timeout: Duration) -> Duration {
    ERROR_BODY_WAIT.min(timeout / 2)
}

/// A body as it is read.
pub(super) struct Body {
    /// 2xx: the answer; the body must be read whole.
    ok: bool,
    status: u16,
    read: BytesMut,
}

impl Body {
    /// The body of an answer of `status`, whose head announced `length` bytes (when it did): a
    /// 2xx announcing more than the limit is refused before any of it is read.
    pub fn new(status: u16, length: Option<u64>) -> Result<Body, UpstreamError> {
        let ok = (200..300).contains(&status);
        let limit = if ok {
            MAX_ANSWER_BYTES
        } else {
            ERROR_BODY_KEPT
        };
        let length = length.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        if ok && length.is_some_and(|n| n > limit) {
            return Err(too_large(status));
        }
        Ok(Body {
            ok,
            status,
            read: BytesMut::with_capacity(length.unwrap_or(0).min(limit).min(RESERVED_BEFORE_READ)),
        })
    }

    /// Add the next chunk. `Ok(false)`: no more is wanted (an error's start is kept), and the
    /// connection, with the rest of the body unread, must not be used again.
    pub fn take(&mut self, chunk: &[u8]) -> Result<bool, UpstreamError> {
        if self.ok {
            if chunk.len() > MAX_ANSWER_BYTES - self.read.len() {
                return Err(too_large(self.status));
            }
            self.read.extend_from_slice(chunk);
            return Ok(true);
        }
        let room = ERROR_BODY_KEPT - self.read.len();
        self.read.extend_from_slice(&chunk[..chunk.len().min(room)]);
        Ok(self.read.len() < ERROR_BODY_KEPT)
    }

    pub fn into_bytes(self) -> Bytes {
        self.read.freeze()
    }

    /// Run `read`, which fills an error's body and says whether it read it whole. An error's
    /// body is only its message, so a read of it that fails, or takes longer than `wait`, ends
    /// it with what came (`false`: the connection is not to be used again): the status says
    /// what failed. A 401 whose body broke or stalled is then the 401 it is, final, rather than
    /// a broken connection, retried until the attempts or the whole-call timeout ran out.
    pub async fn read_error(
        wait: Duration,
        read: impl Future<Output = Result<bool, UpstreamError>>,
    ) -> bool {
        matches!(tokio::time::timeout(wait, read).await, Ok(Ok(true)))
    }

    /// Whether the answer's status is not a 2xx: only the start of its body is read.
    pub fn is_error(&self) -> bool {
        !self.ok
    }
}

fn too_large(status: u16) -> UpstreamError {
    UpstreamError::new(
        ErrorKind::TooLarge,
        Some(status),
        format!("upstream answer larger than {MAX_ANSWER_BYTES} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2xx_is_read_whole_up_to_the_limit_and_an_error_only_its_start() {
        // Announced past the limit: refused before a byte of it is read.
        let err = Body::new(200, Some(MAX_ANSWER_BYTES as u64 + 1))
            .err()
            .unwrap();
        assert_eq!((err.kind, err.retryable()), (ErrorKind::TooLarge, false));
        let mut ok = Body::new(200, None).unwrap();
        assert!(ok.take(&vec![b'a'; MAX_ANSWER_BYTES]).unwrap());
        assert_eq!(ok.take(b"b").err().unwrap().kind, ErrorKind::TooLarge);
        // An error, whatever length it announces, is read as far as its first 8 KiB.
        let mut error = Body::new(500, Some(u64::MAX)).unwrap();
        assert!(error.take(&[b'e'; 5000]).unwrap());
        assert!(!error.take(&[b'f'; 5000]).unwrap());
        assert_eq!(error.into_bytes().len(), ERROR_BODY_KEPT);
    }

    // What is reserved before a byte comes is bounded whatever the head announces; a body
    // that does come in full still reads whole.
    #[test]
    fn an_announced_length_reserves_at_most_64_kib_until_the_bytes_come() {
        let announced = MAX_ANSWER_BYTES as u64;
        let mut big = Body::new(200, Some(announced)).unwrap();
        assert_eq!(big.read.capacity(), RESERVED_BEFORE_READ);
        for _ in 0..16 {
            assert!(big.take(&vec![b'a'; 1 << 20]).unwrap());
        }
        assert_eq!(big.into_bytes().len(), MAX_ANSWER_BYTES);
        assert_eq!(Body::new(200, Some(100)).unwrap().read.capacity(), 100);
    }
}
