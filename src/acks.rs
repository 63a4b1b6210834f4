//! Acknowledgements of many messages in one frame. Messages finish out of order; once every
//! message up to a delivery tag is finished, one `basic.ack` with `multiple` settles them
//! all. A finished message behind an unfinished one is acknowledged alone after a few
//! milliseconds, so a slow message never holds the prefetch of those after it.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::Channel;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// How long a finished message may wait for the ones before it to finish.
const ACK_DELAY: Duration = Duration::from_millis(5);

enum Note {
    /// The broker delivered this tag: it is outstanding until settled.
    Arrived(u64),
    /// Its processing is finished and it is to be acknowledged.
    Done(u64),
    /// It was settled otherwise (rejected, or returned to the queue).
    Settled(u64),
}

/// The acknowledgements of one channel's consumer.
pub struct Acks {
    notes: mpsc::UnboundedSender<Note>,
    task: JoinHandle<()>,
}

/// A handle for the message handlers; cheap to clone.
#[derive(Clone)]
pub struct AckHandle {
    notes: mpsc::UnboundedSender<Note>,
}

impl Acks {
    pub fn start(channel: Channel) -> Acks {
        let (notes, receiver) = mpsc::unbounded_channel();
        Acks {
            notes,
            task: tokio::spawn(settle(channel, receiver)),
        }
    }

    /// Must be called for every delivery, before its handler can finish it.
    pub fn arrived(&self, delivery_tag: u64) {
        let _ = self.notes.send(Note::Arrived(delivery_tag));
    }

    pub fn handle(&self) -> AckHandle {
        AckHandle {
            notes: self.notes.clone(),
        }
    }

    /// Sends every acknowledgement still due, once no handler is left.
    pub async fn finish(self) {
        drop(self.notes);
        let _ = self.task.await;
    }
}

impl AckHandle {
    /// The message is finished: acknowledge it (soon, perhaps with others).
    pub fn ack(&self, delivery_tag: u64) {
        let _ = self.notes.send(Note::Done(delivery_tag));
    }

    /// The message was settled by a reject or nack whose frame is already sent.
    pub fn settled(&self, delivery_tag: u64) {
        let _ = self.notes.send(Note::Settled(delivery_tag));
    }
}

/// Outstanding tags: `None` while under way, `Some(when)` once finished.
type Outstanding = BTreeMap<u64, Option<Instant>>;

async fn settle(channel: Channel, mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut outstanding = Outstanding::new();
    let mut open = true;
    while open || outstanding.values().any(Option::is_some) {
        let due = outstanding
            .values()
            .flatten()
            .min()
            .map(|at| *at + ACK_DELAY);
        tokio::select! {
            note = notes.recv(), if open => match note {
                Some(note) => note_down(&mut outstanding, note),
                None => open = false,
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
        }
        while let Ok(note) = notes.try_recv() {
            note_down(&mut outstanding, note);
        }
        // Once the handlers are gone, whatever is finished is acknowledged now.
        let late = if open {
            Instant::now() - ACK_DELAY
        } else {
            Instant::now()
        };
        for (tag, multiple) in due_acks(&mut outstanding, late) {
            if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
                debug!(error = %e, "could not acknowledge; the broker will deliver again");
                return;
            }
        }
    }
}

fn note_down(outstanding: &mut Outstanding, note: Note) {
    match note {
        Note::Arrived(tag) => {
            outstanding.insert(tag, None);
        }
        Note::Done(tag) => {
            outstanding.insert(tag, Some(Instant::now()));
        }
        Note::Settled(tag) => {
            outstanding.remove(&tag);
        }
    }
}

/// The acknowledgements to send now, removed from `outstanding`: one `multiple` ack for
/// the finished run at the front, and one each for finished messages behind an unfinished
/// one that finished before `late`.
fn due_acks(outstanding: &mut Outstanding, late: Instant) -> Vec<(u64, bool)> {
    let mut acks = Vec::new();
    let mut front = None;
    while let Some((&tag, Some(_))) = outstanding.first_key_value() {
        outstanding.pop_first();
        front = Some(tag);
    }
    if let Some(tag) = front {
        acks.push((tag, true));
    }
    let stale: Vec<u64> = outstanding
        .iter()
        .filter(|(_, done)| done.is_some_and(|at| at <= late))
        .map(|(tag, _)| *tag)
        .collect();
    for tag in stale {
        outstanding.remove(&tag);
        acks.push((tag, false));
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_front_is_one_ack_and_a_gap_waits_its_turn() {
        let now = Instant::now();
        let mut outstanding: Outstanding = (1..=6).map(|tag| (tag, None)).collect();
        for tag in [1, 2, 3, 5] {
            outstanding.insert(tag, Some(now));
        }
        // 4 is under way: 1-3 go in one frame, 5 waits for 4 while it is young.
        assert_eq!(due_acks(&mut outstanding, now - ACK_DELAY), vec![(3, true)]);
        outstanding.insert(4, Some(now));
        assert_eq!(due_acks(&mut outstanding, now - ACK_DELAY), vec![(5, true)]);
        assert_eq!(outstanding.keys().collect::<Vec<_>>(), vec![&6]);
    }

    #[test]
    fn a_finished_message_behind_a_slow_one_is_acknowledged_alone_once_late() {
        let now = Instant::now();
        let mut outstanding: Outstanding = (1..=3).map(|tag| (tag, None)).collect();
        outstanding.insert(2, Some(now));
        outstanding.insert(3, Some(now));
        assert_eq!(
            due_acks(&mut outstanding, now),
            vec![(2, false), (3, false)]
        );
        assert_eq!(outstanding.len(), 1, "1 is still under way");
    }
}
