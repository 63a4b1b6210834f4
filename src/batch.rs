//! Group commit: the writes that every message makes (storing an event, recording a
//! success) are sent to Postgres many at a time, as one statement, so that a busy worker
//! pays one round trip and one commit for a batch instead of one per message. An idle
//! worker sends each write at once: a batch is whatever queued up while the previous
//! statement was under way, so batching adds no wait beyond that statement.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use crate::store::{Store, is_transient};

/// One kind of batched write: its statement for many requests, answering each in order.
pub type BatchOp<Req, Out> =
    for<'a> fn(&'a Store, &'a [Req]) -> BoxFuture<'a, Result<Vec<Out>, sqlx::Error>>;

/// Requests that are the same write (one event id, one attempt) never share a batch: the
/// second waits for the next one, which then sees what the first did.
pub type BatchKey<Req> = fn(&Req) -> (Uuid, u32);

type Request<Req, Out> = (Req, oneshot::Sender<Result<Out, sqlx::Error>>);

/// A handle to a running batcher; cheap to clone.
pub struct Batcher<Req, Out> {
    requests: mpsc::UnboundedSender<Request<Req, Out>>,
}

impl<Req, Out> Clone for Batcher<Req, Out> {
    fn clone(&self) -> Self {
        Batcher {
            requests: self.requests.clone(),
        }
    }
}

/// How a batcher runs: at most `concurrency` statements at once, each of at most
/// `max_batch` requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub concurrency: usize,
    pub max_batch: usize,
}

impl<Req: Send + Sync + 'static, Out: Send + 'static> Batcher<Req, Out> {
    /// Starts the batcher's task on the current runtime; it ends when every handle is gone.
    pub fn spawn(
        store: Store,
        op: BatchOp<Req, Out>,
        key: BatchKey<Req>,
        limits: Limits,
    ) -> Batcher<Req, Out> {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(collect(store, op, key, limits, receiver));
        Batcher { requests }
    }

    /// Runs one request within a batch. An error is the batch's: a transient one (the
    /// statement may or may not have committed) is given to every request of the batch,
    /// to be retried like any transient error; any other error is the request's own.
    pub async fn run(&self, request: Req) -> Result<Out, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((request, reply)).is_err() {
            return Err(sqlx::Error::PoolClosed);
        }
        answer.await.unwrap_or(Err(sqlx::Error::WorkerCrashed))
    }
}

/// Takes requests as they come, a batch at a time. One statement runs at a time unless a
/// full batch (`max_batch` requests) is waiting: a batch is then as large as what queued
/// while the previous statement ran, which is what makes a busy worker's writes cheap
/// (each statement has a fixed cost in Postgres), and the other slots add parallelism
/// only where one statement at a time cannot keep up.
async fn collect<Req: Send + Sync + 'static, Out: Send + 'static>(
    store: Store,
    op: BatchOp<Req, Out>,
    key: BatchKey<Req>,
    limits: Limits,
    mut receiver: mpsc::UnboundedReceiver<Request<Req, Out>>,
) {
    let concurrency = limits.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let finished = Arc::new(Notify::new());
    let mut queue: VecDeque<Request<Req, Out>> = VecDeque::new();
    let mut open = true;
    loop {
        while let Ok(request) = receiver.try_recv() {
            queue.push_back(request);
        }
        let running = slots.available_permits() < concurrency;
        if queue.is_empty() || (running && queue.len() < limits.max_batch) {
            if !open && queue.is_empty() {
                return;
            }
            tokio::select! {
                _ = finished.notified(), if running => {}
                request = receiver.recv(), if open => match request {
                    Some(request) => queue.push_back(request),
                    None => open = false,
                },
            }
            continue;
        }
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let batch = take_batch(&mut queue, key, limits.max_batch);
        let (store, finished) = (store.clone(), finished.clone());
        tokio::spawn(async move {
            execute(&store, op, batch).await;
            drop(slot);
            finished.notify_one();
        });
    }
}

/// The first `max_batch` requests of the queue with distinct keys, in order; a request
/// with the key of one taken stays queued for a later batch.
fn take_batch<Req, Out>(
    queue: &mut VecDeque<Request<Req, Out>>,
    key: BatchKey<Req>,
    max_batch: usize,
) -> Vec<Request<Req, Out>> {
    let mut keys = HashSet::new();
    let mut batch = Vec::new();
    let mut kept = VecDeque::new();
    while batch.len() < max_batch {
        let Some(request) = queue.pop_front() else {
            break;
        };
        if keys.insert(key(&request.0)) {
            batch.push(request);
        } else {
            kept.push_back(request);
        }
    }
    kept.append(queue);
    *queue = kept;
    batch
}

/// Runs a batch and answers each request. A batch that Postgres refuses is run again one
/// request at a time, so that one bad request fails alone.
async fn execute<Req, Out>(store: &Store, op: BatchOp<Req, Out>, batch: Vec<Request<Req, Out>>) {
    let (requests, replies): (Vec<Req>, Vec<_>) = batch.into_iter().unzip();
    match op(store, &requests).await {
        Ok(outs) => {
            debug_assert_eq!(outs.len(), requests.len());
            for (reply, out) in replies.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) if requests.len() > 1 && !is_transient(&e) => {
            for (request, reply) in requests.iter().zip(replies) {
                let out = op(store, std::slice::from_ref(request)).await;
                let _ =
                    reply.send(out.and_then(|mut outs| outs.pop().ok_or(sqlx::Error::RowNotFound)));
            }
        }
        Err(e) => {
            let reason = e.to_string();
            let mut replies = replies.into_iter();
            if let Some(first) = replies.next() {
                let _ = first.send(Err(e));
            }
            for reply in replies {
                let _ = reply.send(Err(sqlx::Error::Io(std::io::Error::other(format!(
                    "a batched statement failed: {reason}"
                )))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use futures_util::FutureExt;
    use futures_util::future::join_all;

    use super::*;

    /// What the statements saw: each batch's size, and the most that ran at once.
    #[derive(Default)]
    struct Seen {
        sizes: Vec<usize>,
        running: usize,
        most_running: usize,
    }

    /// A request: its key and where its statement reports what it saw.
    type Req = (u32, Arc<Mutex<Seen>>);

    /// A statement that takes 100 ms and answers each request with its key.
    fn slow<'a>(_: &'a Store, batch: &'a [Req]) -> BoxFuture<'a, Result<Vec<u32>, sqlx::Error>> {
        async move {
            let seen = batch[0].1.clone();
            {
                let mut seen = seen.lock().unwrap();
                seen.sizes.push(batch.len());
                seen.running += 1;
                seen.most_running = seen.most_running.max(seen.running);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen.lock().unwrap().running -= 1;
            Ok(batch.iter().map(|r| r.0).collect())
        }
        .boxed()
    }

    fn key(request: &Req) -> (Uuid, u32) {
        (Uuid::nil(), request.0)
    }

    /// Sends one request, then, while its statement runs, `then` (request keys).
    async fn run(max_batch: usize, then: &[u32]) -> Seen {
        let store = Store::connect_lazy("postgres://127.0.0.1:1/none", 1).unwrap();
        let limits = Limits {
            concurrency: 4,
            max_batch,
        };
        let batcher = Batcher::spawn(store, slow, key, limits);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let first = batcher.run((1000, seen.clone()));
        let later = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            join_all(then.iter().map(|&k| batcher.run((k, seen.clone())))).await
        };
        let (first, later) = tokio::join!(first, later);
        assert_eq!(first.unwrap(), 1000);
        let answers: Vec<u32> = later.into_iter().map(Result::unwrap).collect();
        assert_eq!(answers, then, "each request gets its own answer");
        Arc::into_inner(seen).unwrap().into_inner().unwrap()
    }

    #[tokio::test]
    async fn what_queues_behind_a_running_statement_becomes_one_batch() {
        let seen = run(256, &(0..30).collect::<Vec<_>>()).await;
        assert_eq!(seen.sizes, vec![1, 30]);
        assert_eq!(
            seen.most_running, 1,
            "free slots are not used for part batches"
        );
    }

    #[tokio::test]
    async fn full_batches_use_the_other_slots() {
        let seen = run(5, &(0..12).collect::<Vec<_>>()).await;
        assert_eq!(seen.sizes, vec![1, 5, 5, 2]);
        assert_eq!(seen.most_running, 3);
    }

    #[tokio::test]
    async fn requests_for_the_same_write_never_share_a_batch() {
        let seen = run(256, &[1, 2, 1, 3, 1]).await;
        assert_eq!(seen.sizes, vec![1, 3, 1, 1]);
    }
}
