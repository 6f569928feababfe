//! Which derivation of a build graph to start next: a pure planner, no I/O.
//!
//! A scheduler (`nixmux build`, a daemon) knows the whole graph
//! before it starts and has a limited number of build slots. When a slot frees, it should start
//! the ready derivation that most delays the end of the run: the one with the **longest chain
//! of derivations waiting behind it** (its *height*: 1 for a root, 1 + the highest of its
//! dependents otherwise), the classic critical-path list-scheduling rule. Ties go to the order
//! the jobs were given in, so a caller's own order (say, dependencies first as a walk found
//! them) still decides among equals.
//!
//! Why not simply "the first ready one": on a graph where several middle derivations each
//! wait for a group of leaves, taking leaves group by group starts the first middle
//! derivations early, and they then hold slots while the leaves of the last group wait; the
//! last group, its middle derivation and the root end up a round later than needed. Nix's own
//! scheduler (`Worker::run` in Nix's `build/worker.cc`) has no such order: it starts goals as
//! they become runnable. On the graph bench's 137 derivations (128 leaves, 8 middle, 1 root)
//! on 16 slots, the last middle derivation started 0.3 s after the others with the first
//! ready one taken (its last leaf went in the last round of leaves); with heights, every
//! middle derivation becomes ready with the last round of leaves.
//!
//! [`BuildQueue`] only orders: the caller starts, runs and reports each job.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// A job's state in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Some of its inputs are not built yet.
    Waiting,
    /// Every input is built; not started.
    Ready,
    /// Handed out by [`BuildQueue::next_ready`].
    Started,
    Built,
    /// Failed, or can never build because an input failed.
    Failed,
}

/// The jobs of a build graph, handed out highest first (see the module documentation).
#[derive(Debug)]
pub struct BuildQueue<K> {
    keys: Vec<K>,
    index: BTreeMap<K, usize>,
    /// Inputs of each job not built yet.
    inputs_left: Vec<usize>,
    /// Jobs that need each job.
    dependents: Vec<Vec<usize>>,
    height: Vec<u32>,
    state: Vec<State>,
    /// Ready jobs: highest first, then in the order given.
    ready: BinaryHeap<(u32, Reverse<usize>)>,
    started: usize,
    finished: usize,
}

impl<K: Ord + Clone> BuildQueue<K> {
    /// A queue of `jobs`, each with the jobs it needs. An input that is not one of the jobs is
    /// taken as available (valid already); a job listed twice counts once (the first time).
    /// Jobs in a dependency cycle (which derivations cannot form) never become ready.
    pub fn new(jobs: impl IntoIterator<Item = (K, Vec<K>)>) -> Self {
        let mut keys = Vec::new();
        let mut index = BTreeMap::new();
        let mut inputs = Vec::new();
        for (k, deps) in jobs {
            if index.contains_key(&k) {
                continue;
            }
            index.insert(k.clone(), keys.len());
            keys.push(k);
            inputs.push(deps);
        }
        let n = keys.len();
        let mut inputs_left = vec![0; n];
        let mut dependents = vec![Vec::new(); n];
        for (i, deps) in inputs.iter().enumerate() {
            let mut seen = Vec::new();
            for d in deps {
                if let Some(&j) = index.get(d)
                    && j != i
                    && !seen.contains(&j)
                {
                    seen.push(j);
                    inputs_left[i] += 1;
                    dependents[j].push(i);
                }
            }
        }
        let height = heights(&dependents);
        let mut ready = BinaryHeap::new();
        let mut state = vec![State::Waiting; n];
        for i in 0..n {
            if inputs_left[i] == 0 {
                state[i] = State::Ready;
                ready.push((height[i], Reverse(i)));
            }
        }
        BuildQueue {
            keys,
            index,
            inputs_left,
            dependents,
            height,
            state,
            ready,
            started: 0,
            finished: 0,
        }
    }

    /// The ready job to start now, if any; it counts as started.
    pub fn next_ready(&mut self) -> Option<K> {
        while let Some((_, Reverse(i))) = self.ready.pop() {
            if self.state[i] == State::Ready {
                self.state[i] = State::Started;
                self.started += 1;
                return Some(self.keys[i].clone());
            }
        }
        None
    }

    /// `job` was built: the jobs whose last missing input it was become ready.
    pub fn built(&mut self, job: &K) {
        let Some(&i) = self.index.get(job) else {
            return;
        };
        if matches!(self.state[i], State::Built | State::Failed) {
            return;
        }
        self.finish(i, State::Built);
        for d in self.dependents[i].clone() {
            self.inputs_left[d] = self.inputs_left[d].saturating_sub(1);
            if self.inputs_left[d] == 0 && self.state[d] == State::Waiting {
                self.state[d] = State::Ready;
                self.ready.push((self.height[d], Reverse(d)));
            }
        }
    }

    /// `job` failed (or will not be built: the caller gave up on it): every job that needs it,
    /// directly or not, can never build. Returns those, in the order given, which were not
    /// failed already.
    pub fn failed(&mut self, job: &K) -> Vec<K> {
        let Some(&i) = self.index.get(job) else {
            return Vec::new();
        };
        if matches!(self.state[i], State::Built | State::Failed) {
            return Vec::new();
        }
        self.finish(i, State::Failed);
        let mut lost = Vec::new();
        let mut stack = self.dependents[i].clone();
        while let Some(d) = stack.pop() {
            if matches!(self.state[d], State::Failed | State::Built) {
                continue;
            }
            // A dependent cannot have started: one of its inputs had not finished.
            self.finish(d, State::Failed);
            lost.push(d);
            stack.extend(self.dependents[d].iter().copied());
        }
        lost.sort_unstable();
        lost.into_iter().map(|d| self.keys[d].clone()).collect()
    }

    fn finish(&mut self, i: usize, to: State) {
        if self.state[i] == State::Started {
            self.started -= 1;
        }
        self.state[i] = to;
        self.finished += 1;
    }

    /// Jobs handed out and not reported yet.
    pub fn running(&self) -> usize {
        self.started
    }

    /// Jobs neither finished nor started (ready or waiting for inputs).
    pub fn pending(&self) -> usize {
        self.keys.len() - self.finished - self.started
    }

    /// Jobs in the queue.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the queue has no jobs at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The job's height: how many jobs, itself included, the longest chain of jobs that
    /// need it has (1 for a job nothing needs). `None` for a job not in the queue.
    pub fn height(&self, job: &K) -> Option<u32> {
        self.index.get(job).map(|&i| self.height[i])
    }
}

/// Heights by a reverse topological walk (Kahn's algorithm from the roots down), so a deep
/// graph costs no recursion. Jobs on a cycle keep height 0.
fn heights(dependents: &[Vec<usize>]) -> Vec<u32> {
    let n = dependents.len();
    // Inputs of each job, as indices (the reverse of `dependents`).
    let mut job_inputs = vec![Vec::new(); n];
    for (j, ds) in dependents.iter().enumerate() {
        for &d in ds {
            job_inputs[d].push(j);
        }
    }
    let mut dependents_left: Vec<usize> = dependents.iter().map(Vec::len).collect();
    let mut height = vec![0u32; n];
    let mut stack: Vec<usize> = (0..n).filter(|&i| dependents_left[i] == 0).collect();
    while let Some(i) = stack.pop() {
        height[i] = 1 + dependents[i].iter().map(|&d| height[d]).max().unwrap_or(0);
        for &j in &job_inputs[i] {
            dependents_left[j] -= 1;
            if dependents_left[j] == 0 {
                stack.push(j);
            }
        }
    }
    height
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `groups` middle jobs each needing `per` leaves, and a root needing the middle ones,
    /// listed as a dependencies-first walk finds them (leaves of m0, m0, leaves of m1, ...).
    fn fan(groups: usize, per: usize) -> Vec<(String, Vec<String>)> {
        let mut jobs = Vec::new();
        for g in 0..groups {
            let leaves: Vec<String> = (0..per).map(|i| format!("l{g}-{i}")).collect();
            for l in &leaves {
                jobs.push((l.clone(), vec![]));
            }
            jobs.push((format!("m{g}"), leaves));
        }
        jobs.push(("top".into(), (0..groups).map(|g| format!("m{g}")).collect()));
        jobs
    }

    #[test]
    fn heights_count_the_longest_chain_waiting_behind_a_job() {
        let q = BuildQueue::new(fan(2, 2));
        assert_eq!(q.height(&"top".to_string()), Some(1));
        assert_eq!(q.height(&"m1".to_string()), Some(2));
        assert_eq!(q.height(&"l0-1".to_string()), Some(3));
        assert_eq!(q.height(&"nope".to_string()), None);
    }

    #[test]
    fn every_leaf_goes_before_a_middle_job_and_ties_keep_the_given_order() {
        let mut q = BuildQueue::new(fan(2, 2));
        let first: Vec<String> = std::iter::from_fn(|| q.next_ready()).collect();
        assert_eq!(first, ["l0-0", "l0-1", "l1-0", "l1-1"]);
        q.built(&"l0-0".into());
        q.built(&"l0-1".into());
        assert_eq!(q.next_ready().as_deref(), Some("m0"));
        assert_eq!(q.next_ready(), None);
        assert_eq!((q.running(), q.pending()), (3, 2));
    }

    #[test]
    fn a_job_starts_only_once_all_its_inputs_are_built_and_the_run_drains() {
        let mut q = BuildQueue::new(fan(3, 4));
        let mut order = Vec::new();
        let mut built = std::collections::BTreeSet::new();
        while let Some(j) = q.next_ready() {
            for (k, deps) in fan(3, 4) {
                if k == j {
                    assert!(deps.iter().all(|d| built.contains(d)), "{j} started early");
                }
            }
            built.insert(j.clone());
            q.built(&j);
            order.push(j);
        }
        assert_eq!(order.len(), 3 * 4 + 3 + 1);
        assert_eq!(order.last().map(String::as_str), Some("top"));
        assert_eq!((q.running(), q.pending()), (0, 0));
    }

    #[test]
    fn a_failure_removes_everything_that_needs_it_and_nothing_else() {
        let mut q = BuildQueue::new(fan(2, 2));
        let leaves: Vec<String> = std::iter::from_fn(|| q.next_ready()).collect();
        assert_eq!(leaves.len(), 4);
        assert_eq!(q.failed(&"l0-0".into()), ["m0", "top"]);
        // Reported twice, or a job already lost: nothing more.
        assert!(q.failed(&"l0-0".into()).is_empty());
        assert!(q.failed(&"m0".into()).is_empty());
        for l in ["l0-1", "l1-0", "l1-1"] {
            q.built(&l.to_string());
        }
        assert_eq!(q.next_ready().as_deref(), Some("m1"));
        q.built(&"m1".into());
        assert_eq!(q.next_ready(), None);
        assert_eq!((q.running(), q.pending()), (0, 0));
    }

    #[test]
    fn outside_inputs_count_as_available_and_duplicates_once() {
        let mut q = BuildQueue::new(vec![
            ("a".to_string(), vec!["valid-already".to_string()]),
            ("b".to_string(), vec!["a".to_string(), "a".to_string()]),
            ("a".to_string(), vec!["b".to_string()]),
        ]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.next_ready().as_deref(), Some("a"));
        assert_eq!(q.next_ready(), None);
        q.built(&"a".into());
        assert_eq!(q.next_ready().as_deref(), Some("b"));
    }

    #[test]
    fn a_cycle_never_becomes_ready_and_does_not_hang() {
        let mut q = BuildQueue::new(vec![
            ("a".to_string(), vec!["b".to_string()]),
            ("b".to_string(), vec!["a".to_string()]),
            ("c".to_string(), vec![]),
        ]);
        assert_eq!(q.height(&"a".into()), Some(0));
        assert_eq!(q.next_ready().as_deref(), Some("c"));
        assert_eq!(q.next_ready(), None);
        assert_eq!(q.pending(), 2);
    }

    #[test]
    fn a_deep_chain_needs_no_recursion() {
        let n = 200_000;
        let jobs = (0..n).map(|i| (i, if i == 0 { vec![] } else { vec![i - 1] }));
        let mut q = BuildQueue::new(jobs);
        assert_eq!(q.height(&0), Some(n as u32));
        let mut count = 0;
        while let Some(j) = q.next_ready() {
            q.built(&j);
            count += 1;
        }
        assert_eq!(count, n);
    }
}
