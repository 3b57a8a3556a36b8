//! A linearizability checker for histories of one register per key (read,
//! write, compare-and-swap), in the style of Wing & Gong with Lowe's
//! memoization (as Porcupine and Knossos do): search for an order of the
//! operations that respects real time (an operation that returned before
//! another was called comes first) and the register's semantics. Keys are
//! independent registers, so each key's sub-history is checked alone.
//!
//! An operation whose outcome is unknown (the client got an error or a
//! timeout) may have taken effect at any time after its call, or never: it
//! has no return time and its result is not checked.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read,
    Write(String),
    /// Compare-and-swap: (expected, new).
    Cas(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A read's value (`None`: the key does not exist).
    Read(Option<String>),
    Written,
    /// A CAS: whether it swapped.
    Cas(bool),
    /// An error or timeout: may or may not have happened.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub call: Instant,
    pub ret: Instant,
    pub outcome: Outcome,
}

/// Checks every key's history; `Err` names the first key that has no
/// linearization, with its history.
pub fn check(history: &[Event]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in history {
        by_key.entry(&e.key).or_default().push(e);
    }
    for (key, evs) in by_key {
        if !check_register(&evs) {
            let t0 = evs.iter().map(|e| e.call).min().unwrap();
            let mut lines = Vec::new();
            for e in &evs {
                lines.push(format!(
                    "  client {} {:?} -> {:?} [{:.3}ms .. {:.3}ms]",
                    e.client,
                    e.op,
                    e.outcome,
                    (e.call - t0).as_secs_f64() * 1e3,
                    (e.ret - t0).as_secs_f64() * 1e3
                ));
            }
            return Err(format!(
                "key {key:?} is not linearizable:\n{}",
                lines.join("\n")
            ));
        }
    }
    Ok(())
}

/// Applies `op` (with its observed outcome) to the register `state`;
/// `None` if the outcome is impossible from this state.
fn step(state: &Option<String>, op: &Op, outcome: &Outcome) -> Option<Option<String>> {
    match (op, outcome) {
        (Op::Read, Outcome::Read(v)) => (v == state).then(|| state.clone()),
        (Op::Read, Outcome::Unknown) => Some(state.clone()),
        (Op::Write(v), Outcome::Written | Outcome::Unknown) => Some(Some(v.clone())),
        (Op::Cas(exp, new), Outcome::Cas(true)) => {
            (state.as_deref() == Some(exp.as_str())).then(|| Some(new.clone()))
        }
        (Op::Cas(exp, _), Outcome::Cas(false)) => {
            (state.as_deref() != Some(exp.as_str())).then(|| state.clone())
        }
        (Op::Cas(exp, new), Outcome::Unknown) => Some(if state.as_deref() == Some(exp.as_str()) {
            Some(new.clone())
        } else {
            state.clone()
        }),
        _ => None,
    }
}

/// First without the unknown writes whose value nobody observed (a read
/// or a successful CAS): "it never happened" is always allowed for them,
/// so success there proves the whole history; it keeps the search small
/// when a nemesis leaves many writes unknown. Otherwise the full search.
fn check_register(evs: &[&Event]) -> bool {
    let mut observed: HashSet<&str> = HashSet::new();
    for e in evs {
        match (&e.op, &e.outcome) {
            (_, Outcome::Read(Some(v))) => {
                observed.insert(v.as_str());
            }
            (Op::Cas(exp, _), Outcome::Cas(true)) => {
                observed.insert(exp.as_str());
            }
            _ => {}
        }
    }
    let unseen_unknown = |e: &&Event| {
        e.outcome == Outcome::Unknown
            && match &e.op {
                Op::Write(v) | Op::Cas(_, v) => !observed.contains(v.as_str()),
                Op::Read => true,
            }
    };
    let pruned: Vec<&Event> = evs.iter().copied().filter(|e| !unseen_unknown(e)).collect();
    search(&pruned) || (pruned.len() != evs.len() && search(evs))
}

fn search(evs: &[&Event]) -> bool {
    // In call order, so the search tries the earliest-called candidate
    // first (the order a sequential history needs), known outcomes first.
    // A read that did not answer changes nothing and proves nothing.
    let mut evs: Vec<&Event> = evs
        .iter()
        .copied()
        .filter(|e| !(e.op == Op::Read && e.outcome == Outcome::Unknown))
        .collect();
    evs.sort_by_key(|e| (e.call, e.outcome == Outcome::Unknown));
    let n = evs.len();
    // Unknown outcomes never return: they may be placed anywhere after
    // their call, or left out.
    let ret = |e: &Event| -> Option<Instant> { (e.outcome != Outcome::Unknown).then_some(e.ret) };
    let must: Vec<bool> = evs.iter().map(|e| e.outcome != Outcome::Unknown).collect();
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let words = n.div_ceil(64);
    // Depth-first search with an explicit stack of (done set, state).
    let mut stack: Vec<(Vec<u64>, Option<String>)> = vec![(vec![0; words], None)];
    let is_done = |d: &[u64], i: usize| d[i / 64] >> (i % 64) & 1 == 1;
    let mut budget: u64 = 5_000_000;
    while let Some((done, state)) = stack.pop() {
        if (0..n).all(|i| !must[i] || is_done(&done, i)) {
            return true;
        }
        budget -= 1;
        if budget == 0 {
            panic!("linearizability check did not finish within its budget");
        }
        // The earliest return among operations not yet placed: whatever is
        // placed next must have been called before it.
        let min_ret = (0..n)
            .filter(|&i| !is_done(&done, i))
            .filter_map(|i| ret(evs[i]))
            .min();
        // Pushed in reverse so the earliest-called candidate is tried first.
        for i in (0..n).rev() {
            if is_done(&done, i) {
                continue;
            }
            if let Some(m) = min_ret {
                if evs[i].call > m {
                    continue;
                }
            }
            if let Some(next) = step(&state, &evs[i].op, &evs[i].outcome) {
                let mut d = done.clone();
                d[i / 64] |= 1 << (i % 64);
                if seen.insert((d.clone(), next.clone())) {
                    stack.push((d, next));
                }
            }
        }
    }
    false
}
