//! Group commit: the writes that every message makes (storing an event, recording a
//! success) are sent to Postgres many at a time, as one statement, so that a busy worker
//! pays one round trip and one commit for a batch instead of one per message. An idle
//! worker sends each write at once: a batch is whatever queued up while the previous ones
//! were under way, so batching adds no wait.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc, oneshot};
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

/// Takes requests as they come, a batch at a time: waits for a free statement slot, then
/// takes everything queued (up to `max_batch`) and runs it.
async fn collect<Req: Send + Sync + 'static, Out: Send + 'static>(
    store: Store,
    op: BatchOp<Req, Out>,
    key: BatchKey<Req>,
    limits: Limits,
    mut receiver: mpsc::UnboundedReceiver<Request<Req, Out>>,
) {
    let slots = Arc::new(Semaphore::new(limits.concurrency.max(1)));
    let mut held_back: VecDeque<Request<Req, Out>> = VecDeque::new();
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let first = match held_back.pop_front() {
            Some(request) => request,
            None => match receiver.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let mut keys = HashSet::from([key(&first.0)]);
        let mut batch = vec![first];
        let mut waiting = std::mem::take(&mut held_back).into_iter();
        let mut next = || waiting.next().or_else(|| receiver.try_recv().ok());
        while batch.len() < limits.max_batch {
            let Some(request) = next() else { break };
            if keys.insert(key(&request.0)) {
                batch.push(request);
            } else {
                held_back.push_back(request);
            }
        }
        held_back.extend(waiting);
        let store = store.clone();
        tokio::spawn(async move {
            execute(&store, op, batch).await;
            drop(slot);
        });
    }
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
