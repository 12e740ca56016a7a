//! Blocking connector work (file reads, decompression, decoding, Parquet encoding, fsync) off tokio's async threads:
//! a connector keeps its state in an [`OffThread`], which moves it to a blocking thread for each call and back.

use nagare_engine::EngineError;

/// A connector's blocking state, run on tokio's blocking threads one call at a time.
///
/// The state is moved into each call and back when it returns, so no lock is held and the async side never waits on
/// I/O. A call that is abandoned (the job stopping) takes the state with it; later calls then fail.
pub struct OffThread<T> {
    state: Option<Box<T>>,
    what: &'static str,
}

impl<T: Send + 'static> OffThread<T> {
    /// Wraps `state`; `what` names the connector in errors.
    pub fn new(state: T, what: &'static str) -> Self {
        OffThread { state: Some(Box::new(state)), what }
    }

    /// Runs `f` on the state on a blocking thread.
    pub async fn run<R, F>(&mut self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut T) -> Result<R, EngineError> + Send + 'static,
    {
        let mut state = self.state.take().ok_or_else(|| self.abandoned())?;
        let (state, result) = tokio::task::spawn_blocking(move || {
            let r = f(&mut state);
            (state, r)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("{}: blocking call failed: {e}", self.what)))?;
        self.state = Some(state);
        result
    }

    /// The state, for quick work that does not block (positions, bookkeeping).
    pub fn get_mut(&mut self) -> Result<&mut T, EngineError> {
        let what = self.what;
        self.state
            .as_deref_mut()
            .ok_or_else(|| EngineError::Internal(format!("{what}: used after a call was abandoned")))
    }

    fn abandoned(&self) -> EngineError {
        EngineError::Internal(format!("{}: used after a call was abandoned", self.what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_blocking_call_leaves_the_async_thread_free() {
        let mut slow = OffThread::new(0u32, "test");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // The blocking call waits for a message that only a task on this (single) async thread sends: it finishes
        // only if the call does not occupy the async thread.
        let sender = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(()).ok();
        });
        let got = slow
            .run(move |n| {
                rx.recv_timeout(std::time::Duration::from_secs(10))
                    .map_err(|_| EngineError::Internal("the async thread was blocked".into()))?;
                *n += 1;
                Ok(*n)
            })
            .await;
        assert_eq!(got.ok(), Some(1));
        sender.await.ok();
        assert_eq!(*slow.get_mut().ok().unwrap_or(&mut 0), 1);
    }
}
