//! The conversions notifications asked for, waiting or running: bounded, one job per repository and
//! tag, a few workers. Pure bookkeeping under the caller's lock; the caller spawns the workers it is
//! told to and runs the jobs.

use std::collections::{HashMap, VecDeque};

/// What became of an offered job.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Queued; `spawn`: start a worker for it (the caller was counted in as one).
    Queued { spawn: bool },
    /// The same tag is waiting already, or converting the same push: nothing more to do.
    Deduplicated,
    /// The tag is converting a push that may not be this one (another digest, or none said): it is
    /// converted again when that one ends, so the newest push is the one stored.
    Again,
    /// Too many jobs waiting: the notification should be sent again later.
    Full,
}

struct Entry<J> {
    job: J,
    digest: Option<String>,
    running: bool,
    again: bool,
}

pub struct Queue<J> {
    waiting: VecDeque<String>,
    jobs: HashMap<String, Entry<J>>,
    workers: usize,
    max_workers: usize,
    max_waiting: usize,
}

impl<J: Clone> Queue<J> {
    pub fn new(max_workers: usize, max_waiting: usize) -> Queue<J> {
        Queue {
            waiting: VecDeque::new(),
            jobs: HashMap::new(),
            workers: 0,
            max_workers,
            max_waiting,
        }
    }

    pub fn offer(&mut self, key: &str, digest: Option<String>, job: J) -> Outcome {
        if let Some(e) = self.jobs.get_mut(key) {
            if !e.running {
                // Still waiting: it resolves the tag when it starts, so it takes this push too.
                return Outcome::Deduplicated;
            }
            if digest.is_some() && digest == e.digest {
                return Outcome::Deduplicated;
            }
            e.again = true;
            e.digest = digest;
            e.job = job;
            return Outcome::Again;
        }
        if self.waiting.len() >= self.max_waiting {
            return Outcome::Full;
        }
        self.jobs.insert(
            key.to_string(),
            Entry {
                job,
                digest,
                running: false,
                again: false,
            },
        );
        self.waiting.push_back(key.to_string());
        let spawn = self.workers < self.max_workers;
        if spawn {
            self.workers += 1;
        }
        Outcome::Queued { spawn }
    }

    /// A worker's next job, marked running; `None` (and the worker no longer counted) when none waits.
    pub fn next(&mut self) -> Option<(String, J)> {
        let Some(key) = self.waiting.pop_front() else {
            self.workers -= 1;
            return None;
        };
        let e = self.jobs.get_mut(&key).expect("a waiting key has its job");
        e.running = true;
        Some((key, e.job.clone()))
    }

    /// The job of `key` ended: gone, or queued again if a newer push came meanwhile.
    pub fn done(&mut self, key: &str) {
        let Some(e) = self.jobs.get_mut(key) else {
            return;
        };
        if e.again {
            e.again = false;
            e.running = false;
            self.waiting.push_back(key.to_string());
        } else {
            self.jobs.remove(key);
        }
    }

    /// Jobs waiting or running.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn one_job_per_tag_and_few_workers() {
        let mut q = Queue::new(2, 3);
        assert_eq!(q.offer("a:1", d("x"), 1), Outcome::Queued { spawn: true });
        assert_eq!(q.offer("a:1", d("y"), 2), Outcome::Deduplicated);
        assert_eq!(q.offer("b:1", d("x"), 3), Outcome::Queued { spawn: true });
        // Two workers at most; the third job waits for one of them.
        assert_eq!(q.offer("c:1", None, 4), Outcome::Queued { spawn: false });
        assert_eq!(q.offer("d:1", None, 5), Outcome::Full);
        assert_eq!(q.next(), Some(("a:1".into(), 1)));
        assert_eq!(q.next(), Some(("b:1".into(), 3)));
        // A room freed by a start takes a new job; the running ones do not hold places.
        assert_eq!(q.offer("d:1", None, 5), Outcome::Queued { spawn: false });
        q.done("a:1");
        assert_eq!(q.next(), Some(("c:1".into(), 4)));
        q.done("b:1");
        assert_eq!(q.next(), Some(("d:1".into(), 5)));
        q.done("c:1");
        q.done("d:1");
        assert_eq!(q.next(), None);
        assert_eq!(q.next(), None);
        assert_eq!(q.len(), 0);
        // Both workers are gone, so the next job starts one.
        assert_eq!(q.offer("e:1", None, 6), Outcome::Queued { spawn: true });
    }

    #[test]
    fn a_new_push_to_a_converting_tag_converts_it_again() {
        let mut q = Queue::new(1, 8);
        assert_eq!(q.offer("a:1", d("x"), 1), Outcome::Queued { spawn: true });
        assert_eq!(q.next(), Some(("a:1".into(), 1)));
        assert_eq!(q.offer("a:1", d("x"), 2), Outcome::Deduplicated);
        assert_eq!(q.offer("a:1", d("y"), 3), Outcome::Again);
        assert_eq!(q.offer("a:1", d("y"), 4), Outcome::Deduplicated);
        q.done("a:1");
        assert_eq!(q.next(), Some(("a:1".into(), 3)));
        // Without a digest a push cannot be told from the running one.
        assert_eq!(q.offer("a:1", None, 5), Outcome::Again);
        q.done("a:1");
        assert_eq!(q.next(), Some(("a:1".into(), 5)));
        q.done("a:1");
        assert_eq!(q.next(), None);
        assert_eq!(q.len(), 0);
    }
}
