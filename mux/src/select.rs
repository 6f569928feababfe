//! Choosing a builder for a derivation: which builders can ever take it, and among those the
//! one to use now. Pure (no I/O, no clock), so the rule is tested on its own.
//!
//! Whether a builder can take a derivation is Nix's rule (src/build-remote/build-remote.cc,
//! `Machine::systemSupported`, `allSupported`, `mandatoryMet` in src/libstore/machines.cc):
//! it lists the derivation's `system` (or the system is `builtin`); it supports or makes
//! mandatory every feature the derivation requires; and the derivation requires every
//! feature the builder makes mandatory.
//!
//! Which one to use: Nix picks, among builders with a free slot, the lowest
//! `load / speed factor`, then the higher speed factor, then the lower load; when all are
//! busy it declines and the daemon asks again later. Here the same order applies, with two
//! differences: a builder that is down (its connections failing) is only used when no
//! healthy one can take the derivation, and when every candidate is busy the least loaded
//! one is returned anyway (counting builds waiting for its slots), so the caller queues on
//! it instead of polling.

use std::collections::BTreeSet;

/// What the selection knows about one builder.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate<'a> {
    pub(crate) name: &'a str,
    pub(crate) systems: &'a [String],
    pub(crate) supported: &'a [String],
    pub(crate) mandatory: &'a [String],
    /// 0: unlimited.
    pub(crate) max_jobs: u32,
    pub(crate) speed_factor: f64,
    /// Builds running plus waiting for a slot.
    pub(crate) load: u64,
    pub(crate) down: bool,
}

/// Why a builder cannot take a derivation.
pub(crate) fn unsuitable(
    c: &Candidate<'_>,
    system: &str,
    required: &BTreeSet<String>,
) -> Option<String> {
    if system != "builtin" && !c.systems.iter().any(|s| s == system) {
        return Some(format!(
            "{}: builds for {} only, not {system}",
            c.name,
            if c.systems.is_empty() {
                "no system".to_owned()
            } else {
                c.systems.join(", ")
            }
        ));
    }
    let missing: Vec<&str> = required
        .iter()
        .filter(|f| !c.supported.contains(f) && !c.mandatory.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "{}: lacks the required feature(s) {}",
            c.name,
            missing.join(", ")
        ));
    }
    let unmet: Vec<&str> = c
        .mandatory
        .iter()
        .filter(|f| !required.contains(*f))
        .map(String::as_str)
        .collect();
    if !unmet.is_empty() {
        return Some(format!(
            "{}: takes only derivations that require {}",
            c.name,
            unmet.join(", ")
        ));
    }
    None
}

/// The index of the builder to use, or every builder's reason for not taking it.
pub(crate) fn choose(
    candidates: &[Candidate<'_>],
    system: &str,
    required: &BTreeSet<String>,
) -> Result<usize, Vec<String>> {
    let mut reasons = Vec::new();
    let able: Vec<usize> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| match unsuitable(c, system, required) {
            Some(why) => {
                reasons.push(why);
                false
            }
            None => true,
        })
        .map(|(i, _)| i)
        .collect();
    if able.is_empty() {
        return Err(reasons);
    }
    let healthy: Vec<usize> = able
        .iter()
        .copied()
        .filter(|&i| !candidates[i].down)
        .collect();
    let pool = if healthy.is_empty() { able } else { healthy };
    let free = |c: &Candidate<'_>| c.max_jobs == 0 || c.load < u64::from(c.max_jobs);
    let with_room: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|&i| free(&candidates[i]))
        .collect();
    let field = if with_room.is_empty() {
        pool
    } else {
        with_room
    };
    let key = |i: usize| {
        let c = &candidates[i];
        let speed = if c.speed_factor > 0.0 {
            c.speed_factor
        } else {
            1.0
        };
        // A builder with unlimited slots counts its load against one slot.
        let slots = f64::from(c.max_jobs.max(1));
        ((c.load as f64 / slots) / speed, -speed, c.load)
    };
    field
        .into_iter()
        .min_by(|&a, &b| {
            let (la, sa, ja) = key(a);
            let (lb, sb, jb) = key(b);
            la.total_cmp(&lb)
                .then(sa.total_cmp(&sb))
                .then(ja.cmp(&jb))
                .then(a.cmp(&b))
        })
        .ok_or(reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    struct Spec {
        name: &'static str,
        systems: Vec<String>,
        supported: Vec<String>,
        mandatory: Vec<String>,
        max_jobs: u32,
        speed: f64,
        load: u64,
        down: bool,
    }

    fn spec(name: &'static str, systems: &[&str], max_jobs: u32) -> Spec {
        Spec {
            name,
            systems: strings(systems),
            supported: Vec::new(),
            mandatory: Vec::new(),
            max_jobs,
            speed: 1.0,
            load: 0,
            down: false,
        }
    }

    fn cands(specs: &[Spec]) -> Vec<Candidate<'_>> {
        specs
            .iter()
            .map(|s| Candidate {
                name: s.name,
                systems: &s.systems,
                supported: &s.supported,
                mandatory: &s.mandatory,
                max_jobs: s.max_jobs,
                speed_factor: s.speed,
                load: s.load,
                down: s.down,
            })
            .collect()
    }

    fn req(f: &[&str]) -> BTreeSet<String> {
        f.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn system_and_features_decide_who_can_take_it() {
        let mut kvm = spec("kvm", &["x86_64-linux"], 2);
        kvm.supported = strings(&["kvm", "big-parallel"]);
        let mut bench = spec("bench", &["x86_64-linux"], 1);
        bench.mandatory = strings(&["benchmark"]);
        let arm = spec("arm", &["aarch64-linux"], 4);
        let specs = [kvm, bench, arm];
        let c = cands(&specs);
        assert_eq!(choose(&c, "x86_64-linux", &req(&["kvm"])), Ok(0));
        assert_eq!(choose(&c, "aarch64-linux", &req(&[])), Ok(2));
        assert_eq!(choose(&c, "x86_64-linux", &req(&["benchmark"])), Ok(1));
        // `builtin` runs anywhere that meets the features (all idle: the first).
        assert_eq!(choose(&c, "builtin", &req(&[])), Ok(0));
        let why = choose(&c, "riscv64-linux", &req(&[])).expect_err("nobody");
        assert_eq!(why.len(), 3);
        assert!(why[0].contains("not riscv64-linux"), "{why:?}");
        let why = choose(&c, "aarch64-linux", &req(&["kvm"])).expect_err("nobody");
        assert!(
            why[2].contains("lacks the required feature(s) kvm"),
            "{why:?}"
        );
        // A mandatory feature the derivation does not require rules the builder out.
        assert_eq!(choose(&c, "x86_64-linux", &req(&["big-parallel"])), Ok(0));
        let why = choose(&c[1..2], "x86_64-linux", &req(&[])).expect_err("mandatory");
        assert!(
            why[0].contains("only derivations that require benchmark"),
            "{why:?}"
        );
    }

    #[test]
    fn least_load_per_speed_wins_then_speed_then_load() {
        let mut a = spec("a", &["x"], 4);
        a.load = 2; // 0.5 per slot
        let mut b = spec("b", &["x"], 2);
        b.load = 0;
        let mut c = spec("c", &["x"], 2);
        c.load = 0;
        c.speed = 2.0;
        let specs = [a, b, c];
        // b and c both idle: the faster one.
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(2));
        let mut specs = specs;
        specs[2].load = 1; // 0.5 / 2 = 0.25
        specs[1].load = 1; // 0.5
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(2));
    }

    #[test]
    fn full_builders_are_passed_over_and_all_full_queues_on_the_least_loaded() {
        let mut a = spec("a", &["x"], 1);
        a.load = 1;
        let mut b = spec("b", &["x"], 4);
        b.load = 3;
        let specs = [a, b];
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(1));
        let mut specs = specs;
        specs[1].load = 6; // 1.5 per slot, a: 1.0
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(0));
    }

    #[test]
    fn a_down_builder_is_the_last_resort() {
        let mut a = spec("a", &["x"], 8);
        a.down = true;
        let mut b = spec("b", &["x"], 1);
        b.load = 3;
        let specs = [a, b];
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(1));
        let mut specs = specs;
        specs[1].systems = strings(&["y"]);
        assert_eq!(choose(&cands(&specs), "x", &req(&[])), Ok(0));
    }
}
