//! Steps that must run to their end, and how an operation still answers its caller in time.
//!
//! mkfs, fsck, resize, mount and unmount are never killed or abandoned half-way: a killed mkfs
//! leaves a half-written filesystem that can later pass for a real one, and an undo step (unmap)
//! that runs while the mount it undoes is still in flight pulls the device from under it.
//!
//! A node operation runs in a task that holds the volume's key (`volume::InFlight::run`) until
//! its work is over. Wrapped with [`answerable`], a step that outlives its deadline answers the
//! caller `DeadlineExceeded` at once ([`to_end`]) and the work goes on; a retry meanwhile gets
//! `Aborted`, and the next one after the work ends finds its outcome on the node.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use super::NodeError;

tokio::task_local! {
    static ANSWER: Mutex<Option<oneshot::Sender<NodeError>>>;
}

/// Where the error of the first overrunning step arrives.
pub struct EarlyAnswer(oneshot::Receiver<NodeError>);

/// Wraps `work` so that its steps can answer the caller before the work is over.
pub fn answerable<F: Future>(work: F) -> (impl Future<Output = F::Output>, EarlyAnswer) {
    let (tx, rx) = oneshot::channel();
    (ANSWER.scope(Mutex::new(Some(tx)), work), EarlyAnswer(rx))
}

/// The work's outcome, or the error of the first step that overran, whichever comes first.
pub async fn first_answer<O>(
    outcome: impl Future<Output = O>,
    early: EarlyAnswer,
) -> Result<O, NodeError> {
    tokio::pin!(outcome);
    let mut early = early.0;
    tokio::select! {
        biased;
        o = &mut outcome => Ok(o),
        // The sender goes away unused when the work ends without overrunning: keep waiting.
        Ok(e) = &mut early => Err(e),
    }
}

/// Awaits `step` to its end. Past `after`, the caller of an [`answerable`] operation is
/// answered `DeadlineExceeded`, and the step is still awaited.
pub async fn to_end<T>(operation: &str, after: Duration, step: impl Future<Output = T>) -> T {
    tokio::pin!(step);
    if let Ok(v) = tokio::time::timeout(after, &mut step).await {
        return v;
    }
    tracing::warn!(
        operation,
        ?after,
        "still running past its deadline; answering DeadlineExceeded and waiting for it to end"
    );
    answer_now(NodeError::StillRunning {
        operation: operation.to_string(),
        after,
    });
    let v = step.await;
    tracing::info!(operation, "finished after overrunning its deadline");
    v
}

/// Blocking work that must not be abandoned (mount syscalls) off the async threads; see
/// [`to_end`].
pub(crate) async fn blocking_to_end<T, F>(
    operation: &str,
    after: Duration,
    f: F,
) -> Result<T, NodeError>
where
    F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    T: Send + 'static,
{
    match to_end(operation, after, tokio::task::spawn_blocking(f)).await {
        Ok(r) => r,
        Err(join) => Err(NodeError::Unavailable(format!(
            "{operation} panicked: {join}"
        ))),
    }
}

fn answer_now(e: NodeError) {
    let _ = ANSWER.try_with(|slot| {
        if let Some(tx) = slot.lock().unwrap().take() {
            let _ = tx.send(e);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeErrorKind;

    #[tokio::test]
    async fn an_overrunning_step_answers_early_and_still_runs_to_its_end() {
        let (work, early) = answerable(async {
            to_end("slow step", Duration::from_millis(20), async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                7
            })
            .await
        });
        let mut task = tokio::spawn(work);
        let e = first_answer(&mut task, early).await.unwrap_err();
        assert_eq!(e.code(), NodeErrorKind::DeadlineExceeded);
        assert!(e.to_string().contains("slow step"), "{e}");
        assert!(!task.is_finished());
        assert_eq!(task.await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_step_within_its_deadline_answers_with_the_outcome() {
        let (work, early) =
            answerable(async { to_end("quick step", Duration::from_secs(5), async { 3 }).await });
        assert_eq!(first_answer(work, early).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn outside_an_answerable_operation_a_step_just_runs_to_its_end() {
        let v = to_end("step", Duration::from_millis(5), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            1
        })
        .await;
        assert_eq!(v, 1);
    }
}
