//! Blocking work that waits on something other than the disk runs on a thread of its own,
//! not in tokio's blocking pool: the pool is bounded (docs/ARCHITECTURE.md, "The blocking
//! pool is bounded, and only the disk waits in it"), and a task that waits on a partner, a
//! resolver or another process's lock could hold a place in it for as long as that takes.

use std::io;
use tokio::sync::oneshot;

/// Runs `f` on a new thread named `name`. The receiver gets what `f` returns; it is closed
/// without a value only if `f` panicked.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<oneshot::Receiver<T>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start a thread ({name}): {e}")))?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "current_thread")]
    async fn the_result_comes_back_and_a_panic_closes_the_channel() {
        let rx = super::spawn("t-ok", || 6 * 7).unwrap();
        assert_eq!(rx.await.unwrap(), 42);
        let rx = super::spawn("t-panic", || -> u32 { panic!("on purpose") }).unwrap();
        assert!(rx.await.is_err());
    }
}
