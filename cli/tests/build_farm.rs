//! `nixmux build -j 16` on a small build farm: three rig builders (real OpenSSH + Nix 2.8)
//! with different systems, features and max-jobs (2, 4, 1) build a 40-derivation graph of
//! mixed systems and features. Checked: every output is valid in the client store with the
//! right contents; every derivation ran on a builder allowed to take it; sampling the
//! builders' process lists throughout, no builder ever ran more builds at once than its
//! max-jobs (and the one with 4 slots did run several at once); a derivation nobody can take
//! fails at once without a connection to any builder. A second run does all of this while
//! every builder collects garbage non-stop, so inputs pushed from the client and outputs of
//! earlier builds can vanish between jobs unless nixmux keeps them alive or sends them again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nixmux_rig::{PrivateStore, Protocol, Rig, RigConfig, log_patterns};

/// What a derivation needs from a builder; each kind has a fixed set of builders that may take
/// it (see [`Kind::allowed`] and the machines file in [`machines_file`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Main system, no features: builders 0 and 1.
    Plain,
    /// Second system (i686-linux on x86_64), no features: builder 1 only (builder 2 takes
    /// only `benchmark` derivations).
    Compat,
    /// Main system, requires `kvm`: builder 0 only.
    Kvm,
    /// Main system, requires `big-parallel`: builders 0 and 1.
    Big,
    /// Second system, requires `benchmark`: builder 2 only (builder 1 lacks the feature).
    Bench,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Compat => "compat",
            Kind::Kvm => "kvm",
            Kind::Big => "big",
            Kind::Bench => "bench",
        }
    }

    fn compat_system(self) -> bool {
        matches!(self, Kind::Compat | Kind::Bench)
    }

    fn features(self) -> &'static [&'static str] {
        match self {
            Kind::Plain | Kind::Compat => &[],
            Kind::Kvm => &["kvm"],
            Kind::Big => &["big-parallel"],
            Kind::Bench => &["benchmark"],
        }
    }

    /// The builders allowed to take it, written out by hand from the machines file rather
    /// than computed by nixmux's own rule.
    fn allowed(self) -> &'static [usize] {
        match self {
            Kind::Plain | Kind::Big => &[0, 1],
            Kind::Compat => &[1],
            Kind::Kvm => &[0],
            Kind::Bench => &[2],
        }
    }
}

/// One derivation of the graph.
struct Node {
    name: String,
    kind: Kind,
    /// Indices of the nodes it reads; empty: it reads the source file instead.
    deps: Vec<usize>,
}

/// The graph: 16 leaves that read a source file pushed from the client, then layers of 12,
/// 8 and 3 derivations reading outputs of the layer below, and one top: 40 derivations,
/// width 16, depth 5, every kind in every layer but the last.
fn graph() -> Vec<Node> {
    use Kind::*;
    fn layer(
        nodes: &mut Vec<Node>,
        tag: &str,
        kinds: &[Kind],
        deps: &dyn Fn(usize) -> Vec<usize>,
    ) -> usize {
        let start = nodes.len();
        for (j, &kind) in kinds.iter().enumerate() {
            nodes.push(Node {
                name: format!("farm-{tag}{j:02}-{}", kind.tag()),
                kind,
                deps: deps(j),
            });
        }
        start
    }
    let mut nodes: Vec<Node> = Vec::new();
    let a = layer(
        &mut nodes,
        "a",
        &[
            Plain, Compat, Kvm, Bench, Big, Compat, Plain, Compat, Compat, Plain, Kvm, Bench, Big,
            Compat, Plain, Compat,
        ],
        &|_| Vec::new(),
    );
    let b = layer(
        &mut nodes,
        "b",
        &[
            Compat, Plain, Bench, Kvm, Compat, Big, Compat, Plain, Bench, Kvm, Compat, Big,
        ],
        &|j| vec![a + (2 * j) % 16, a + (2 * j + 5) % 16],
    );
    let c = layer(
        &mut nodes,
        "c",
        &[Plain, Compat, Bench, Compat, Kvm, Compat, Big, Bench],
        &|j| vec![b + j, b + (j + 4) % 12, b + (j + 9) % 12],
    );
    let d = layer(&mut nodes, "d", &[Compat, Bench, Kvm], &|j| {
        (c + 3 * j..(c + 3 * j + 3).min(c + 8)).collect()
    });
    layer(&mut nodes, "top", &[Plain], &|_| (d..d + 3).collect());
    assert_eq!(nodes.len(), 40);
    nodes
}

/// The second system: on x86_64 the real i686-linux (Nix runs its builds under the 32-bit
/// personality, so `uname -m` says i686); elsewhere a made-up system name that the builders
/// list in `extra-platforms`, which is all Nix checks.
fn systems() -> (String, String, String) {
    let arch = std::env::consts::ARCH;
    let main = format!("{arch}-linux");
    if arch == "x86_64" {
        (main, "i686-linux".to_owned(), "i686".to_owned())
    } else {
        (main, format!("{arch}-compat-linux"), arch.to_owned())
    }
}

/// Marks a build's shell in the builders' process lists: `/bin/sh -c ": farm-job NAME; ..."`
/// has it in its `/proc/PID/cmdline`.
const MARKER: &str = ": farm-job ";

/// The Nix expression: `top`, and two derivations nobody can take.
fn expression(nodes: &[Node], sleep: &str) -> String {
    let (main, compat, _) = systems();
    let mut e = format!(
        "let\n  src = builtins.toFile \"farm-src\" \"source of the farm\\n\";\n  \
         mk = name: system: features: deps: derivation ({{\n    \
         inherit name system;\n    builder = \"/bin/sh\";\n    \
         args = [\"-c\" \"{MARKER}${{name}}; /bin/sleep {sleep}; echo ${{name}} $(/bin/uname -m) > $out; /bin/cat ${{toString deps}} >> $out\"];\n  \
         }} // (if features == [] then {{}} else {{ requiredSystemFeatures = features; }}));\n"
    );
    for (i, n) in nodes.iter().enumerate() {
        let system = if n.kind.compat_system() {
            &compat
        } else {
            &main
        };
        let features: Vec<String> = n
            .kind
            .features()
            .iter()
            .map(|f| format!("\"{f}\""))
            .collect();
        let deps: Vec<String> = if n.deps.is_empty() {
            vec!["src".to_owned()]
        } else {
            n.deps.iter().map(|d| format!("n{d}")).collect()
        };
        e.push_str(&format!(
            "  n{i} = mk \"{}\" \"{system}\" [{}] [{}];\n",
            n.name,
            features.join(" "),
            deps.join(" ")
        ));
    }
    e.push_str(&format!(
        "in {{\n  top = n{};\n  \
         benchmark-on-main = mk \"farm-impossible-bench\" \"{main}\" [\"benchmark\"] [src];\n  \
         kvm-on-compat = mk \"farm-impossible-kvm\" \"{compat}\" [\"kvm\"] [src];\n  \
         in-graph = mk \"farm-impossible-top\" \"{main}\" [] [(mk \"farm-sibling-1\" \"{main}\" [] [src]) (mk \"farm-sibling-2\" \"{compat}\" [] [src]) (mk \"farm-impossible-leaf\" \"{main}\" [\"benchmark\"] [src])];\n}}\n",
        nodes.len() - 1
    ));
    e
}

/// What node `i`'s output must contain: its name and machine, then what it read.
fn expected_contents(nodes: &[Node], i: usize, memo: &mut BTreeMap<usize, String>) -> String {
    if let Some(s) = memo.get(&i) {
        return s.clone();
    }
    let (_, _, compat_machine) = systems();
    let n = &nodes[i];
    let machine = if n.kind.compat_system() {
        compat_machine
    } else {
        std::env::consts::ARCH.to_owned()
    };
    let mut s = format!("{} {machine}\n", n.name);
    if n.deps.is_empty() {
        s.push_str("source of the farm\n");
    }
    for &d in &n.deps {
        s.push_str(&expected_contents(nodes, d, memo));
    }
    memo.insert(i, s.clone());
    s
}

fn instantiate(store: &PrivateStore, expr: &str, attr: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("farm.nix");
    std::fs::write(&f, expr).expect("write");
    let out = store
        .run("nix-instantiate", [f.to_str().expect("utf8"), "-A", attr])
        .expect("instantiate");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builders' max-jobs, by index.
const MAX_JOBS: [usize; 3] = [2, 4, 1];

/// The machines file: builder 0 `ssh://`, main system, `kvm` and `big-parallel`; builder 1
/// `ssh-ng://`, both systems, `big-parallel`; builder 2 `ssh://`, the second system only,
/// `benchmark` supported and mandatory.
fn machines_file(rig: &Rig, path: &Path) {
    let (main, compat, _) = systems();
    let line = |i: usize, protocol: Protocol, systems: &str, supported: &str, mandatory: &str| {
        let b = rig.builder(i);
        format!(
            "{} {systems} {} {} 1 {supported} {mandatory} {}\n",
            b.store_url(protocol),
            rig.client_key().display(),
            MAX_JOBS[i],
            b.host_key_base64()
        )
    };
    let text = [
        line(0, Protocol::Serve, &main, "kvm,big-parallel", "-"),
        line(
            1,
            Protocol::Worker,
            &format!("{main},{compat}"),
            "big-parallel",
            "-",
        ),
        line(2, Protocol::Serve, &compat, "benchmark", "benchmark"),
    ]
    .concat();
    std::fs::write(path, text).expect("machines");
}

fn start_rig() -> Rig {
    nixmux_rig::ensure_peers_installed().expect("peers");
    let (_, compat, _) = systems();
    Rig::start(RigConfig {
        // Nix builds a derivation itself only if its system is `system` or in
        // `extra-platforms` and its required features are in `system-features`
        // (`ParsedDerivation::canBuildLocally`, src/libstore/parsed-derivations.cc), also for
        // builds that arrive over `nix-store --serve` or `nix-daemon --stdio`. Every builder
        // gets the same settings: the machines file alone decides what goes where.
        extra_nix_conf: vec![
            "system-features = kvm big-parallel benchmark".to_owned(),
            format!("extra-platforms = {compat}"),
        ],
        ..RigConfig::with_builders(3)
    })
    .expect("rig")
}

fn nixmux_build(client: &PrivateStore, machines: &Path, logs: &Path, drv: &str) -> Output {
    let mut cmd = client.command(
        env!("CARGO_BIN_EXE_nixmux"),
        [
            "build",
            "--machines",
            machines.to_str().expect("utf8"),
            "--local-store",
            "stdio",
            "--log-dir",
            logs.to_str().expect("utf8"),
            "-j",
            "16",
            drv,
        ],
    );
    cmd.env_remove("SSH_AUTH_SOCK");
    cmd.output().expect("run nixmux build")
}

/// What the process-list sampler saw.
#[derive(Debug, Default)]
struct Observed {
    samples: usize,
    /// Per builder, the most builds seen running at once.
    max_running: [usize; 3],
    /// Per builder, the derivations seen running there.
    ran: [BTreeSet<String>; 3],
}

/// Samples the builders' process lists every 25 ms until `stop`.
///
/// Attribution: [`nixmux_rig::Builder::processes`] lists exactly the processes whose mount
/// namespace is the builder's sshd's, or a private one (Nix 2.8's `nix-store` and
/// `nix-daemon` unshare their own at start, and builds inherit it) in which `/nix` is the
/// builder's store directory (same device and inode). Every builder has its own store
/// directory, so a process belongs to at most one builder, and nothing on the host or in the
/// client's store qualifies. A build is recognised by its shell's command line carrying
/// [`MARKER`] and the derivation's name; counting distinct names (not processes) makes the
/// shell's short-lived forks (for `$(uname -m)` and before exec'ing `sleep`) count once.
/// Builds run without build users here (`build-users-group =`), so the uid cannot tell them
/// apart, and the build directories are all in the host's /tmp.
fn sample(rig: &Rig, stop: &AtomicBool) -> Observed {
    let mut seen = Observed::default();
    while !stop.load(Ordering::Relaxed) {
        for (i, b) in rig.builders().iter().enumerate() {
            let running: BTreeSet<String> = b
                .processes()
                .iter()
                .filter_map(|p| {
                    let rest = &p.cmdline[p.cmdline.find(MARKER)? + MARKER.len()..];
                    Some(rest.split(';').next()?.trim().to_owned())
                })
                .collect();
            seen.max_running[i] = seen.max_running[i].max(running.len());
            assert!(
                running.len() <= MAX_JOBS[i],
                "builder {i} (max-jobs {}) runs {} builds at once: {running:?}",
                MAX_JOBS[i],
                running.len()
            );
            seen.ran[i].extend(running);
        }
        seen.samples += 1;
        std::thread::sleep(Duration::from_millis(25));
    }
    seen
}

/// A garbage collector running non-stop on one builder until `stop`.
struct Collector {
    runs: usize,
    deleted: usize,
}

fn collect_garbage(store: &PrivateStore, stop: &AtomicBool, started: &AtomicUsize) -> Collector {
    let mut c = Collector {
        runs: 0,
        deleted: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        let out = store
            .run("nix-store", ["--gc"])
            .expect("nix-store --gc on a builder");
        c.runs += 1;
        started.fetch_add(1, Ordering::Relaxed);
        // "N store paths deleted, X MiB freed" (Nix 2.8's printFreed,
        // src/nix-store/nix-store.cc), on stdout.
        let text = String::from_utf8_lossy(&out.stdout);
        c.deleted += text
            .lines()
            .find_map(|l| l.split_once(" store paths deleted, "))
            .and_then(|(n, _)| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
    }
    c
}

/// `hash-name.drv` (as nixmux prints it) -> `name`.
fn drv_name(printed: &str) -> &str {
    let base = printed.trim_start_matches("/nix/store/");
    let name = base.split_once('-').map_or(base, |(_, n)| n);
    name.trim_end_matches(".drv")
}

fn farm(gc: bool) {
    let started = Instant::now();
    let rig = start_rig();
    let tmp = tempfile::tempdir().expect("tmp");
    let machines = tmp.path().join("machines");
    machines_file(&rig, &machines);
    let logs = tmp.path().join("logs");
    let nodes = graph();
    let expr = expression(&nodes, "0.4");
    let client = rig.client_store();
    let top = instantiate(client, &expr, "top");
    let ports: Vec<String> = (0..3)
        .map(|i| format!("root@127.0.0.1:{}", rig.builder(i).port()))
        .collect();

    // Build, sampling the builders' processes and (for the GC run) collecting garbage on all
    // of them throughout.
    let (stop, collections) = (&AtomicBool::new(false), &AtomicUsize::new(0));
    let rig = &rig;
    let (out, observed, collectors) = std::thread::scope(|s| {
        let sampler = s.spawn(move || sample(rig, stop));
        let gcs: Vec<_> = if gc {
            rig.builders()
                .iter()
                .map(|b| s.spawn(move || collect_garbage(b.store(), stop, collections)))
                .collect()
        } else {
            Vec::new()
        };
        // Let the collectors get going before the first push.
        while gc && collections.load(Ordering::Relaxed) < 3 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = nixmux_build(client, &machines, &logs, &top);
        stop.store(true, Ordering::Relaxed);
        let observed = sampler.join();
        let collectors: Vec<Collector> = gcs
            .into_iter()
            .map(|h| h.join().expect("collector thread"))
            .collect();
        (out, observed, collectors)
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    let observed = match observed {
        Ok(o) => o,
        Err(panic) => {
            eprintln!("nixmux's stderr:\n{stderr}");
            std::panic::resume_unwind(panic)
        }
    };
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    eprintln!(
        "build {} in {:.1}s; {} samples, most builds at once per builder {:?}",
        if gc { "under GC" } else { "without GC" },
        started.elapsed().as_secs_f64(),
        observed.samples,
        observed.max_running
    );

    // Each derivation built once, on a builder allowed to take it.
    let by_name: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut built_on: BTreeMap<String, usize> = BTreeMap::new();
    for l in stderr.lines().filter(|l| l.starts_with("built ")) {
        let mut words = l.split_whitespace().skip(1);
        let (Some(drv), Some("on"), Some(host)) = (words.next(), words.next(), words.next()) else {
            panic!("unexpected line {l:?}");
        };
        let name = drv_name(drv);
        let node = by_name
            .get(name)
            .unwrap_or_else(|| panic!("built something not in the graph: {l}"));
        let builder = ports
            .iter()
            .position(|p| p == host)
            .unwrap_or_else(|| panic!("unknown builder in {l}"));
        assert!(
            node.kind.allowed().contains(&builder),
            "{name} ({:?}) may not run on builder {builder}: {l}",
            node.kind
        );
        assert!(
            built_on.insert(name.to_owned(), builder).is_none(),
            "{name} built twice"
        );
    }
    assert_eq!(built_on.len(), nodes.len(), "{stderr}");
    let mut per_builder = [0usize; 3];
    for &b in built_on.values() {
        per_builder[b] += 1;
    }
    eprintln!("builds per builder {per_builder:?}");
    // The process lists agree: what was seen running on a builder was built there.
    for (i, ran) in observed.ran.iter().enumerate() {
        for name in ran {
            assert_eq!(
                built_on.get(name),
                Some(&i),
                "{name} seen running on builder {i}"
            );
        }
    }
    // The check above was not vacuous: builds were seen, several at once on the builder
    // with four slots (it alone takes the 16 second-system derivations without features).
    assert!(
        observed.ran.iter().map(BTreeSet::len).sum::<usize>() >= nodes.len() / 2,
        "the sampler saw too few builds: {observed:?}"
    );
    assert!(observed.max_running[1] >= 2, "{observed:?}");
    // Both builders that can take plain derivations got some work.
    for i in 0..3 {
        assert!(built_on.values().any(|&b| b == i), "builder {i} idle");
    }
    // One log file per build.
    assert_eq!(
        std::fs::read_dir(&logs).expect("log dir").count(),
        nodes.len()
    );

    // Every output is in the client store, valid, with the contents its inputs imply.
    let q = client
        .run("nix-store", ["-qR", &top])
        .expect("the graph's closure");
    let drvs: Vec<String> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .filter(|l| l.ends_with(".drv"))
        .map(str::to_owned)
        .collect();
    assert_eq!(drvs.len(), nodes.len());
    let mut memo = BTreeMap::new();
    let mut outputs = Vec::new();
    for drv in &drvs {
        let q = client
            .run("nix-store", ["-q", "--outputs", drv])
            .expect("outputs");
        let output = String::from_utf8_lossy(&q.stdout).trim().to_owned();
        let i = nodes
            .iter()
            .position(|n| n.name == drv_name(drv))
            .unwrap_or_else(|| panic!("{drv} not in the graph"));
        let file = client
            .store_dir()
            .join(output.trim_start_matches("/nix/store/"));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{output} of {drv} in the client store: {e}"));
        assert_eq!(text, expected_contents(&nodes, i, &mut memo), "{output}");
        outputs.push(output);
    }
    let mut verify = vec!["--verify-path".to_owned()];
    verify.extend(outputs);
    client
        .run("nix-store", &verify)
        .expect("every output verifies in the client store");

    if gc {
        let runs: Vec<usize> = collectors.iter().map(|c| c.runs).collect();
        let deleted: usize = collectors.iter().map(|c| c.deleted).sum();
        eprintln!("collections per builder {runs:?}, {deleted} paths deleted in all");
        // The collectors ran throughout and did delete what no build still needed (outputs
        // already fetched, inputs of finished builds), so protection was actually at stake.
        assert!(runs.iter().all(|&r| r >= 3), "{runs:?}");
        assert!(deleted > 0, "the collectors never deleted anything");
        return;
    }

    // Derivations nobody can take fail at once, before any builder is contacted.
    fails_at_once(
        rig,
        &machines,
        &logs,
        &expr,
        "benchmark-on-main",
        "benchmark",
    );
    fails_at_once(rig, &machines, &logs, &expr, "kvm-on-compat", "kvm");
}

/// Builds `attr`, which contains a derivation no builder can take: nixmux must fail with the
/// no-builder exit code and the reason (`why`: the feature at fault), having built nothing
/// and connected to no builder (sshd logs every connection it accepts).
fn fails_at_once(rig: &Rig, machines: &Path, logs: &Path, expr: &str, attr: &str, why: &str) {
    let connections = || -> Vec<usize> {
        rig.builders()
            .iter()
            .map(|b| b.count_log(log_patterns::CONNECTION))
            .collect()
    };
    let client = rig.client_store();
    let drv = instantiate(client, expr, attr);
    let before = connections();
    let t = Instant::now();
    let out = nixmux_build(client, machines, logs, &drv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{attr}: {stderr}");
    assert!(stderr.contains("no builder can build"), "{stderr}");
    assert!(stderr.contains(why), "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.starts_with("building ")),
        "{attr}: started builds\n{stderr}"
    );
    assert_eq!(
        connections(),
        before,
        "{attr}: a builder was contacted\n{stderr}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{attr} took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_forty_derivation_graph_keeps_to_systems_features_and_slots() {
    farm(false);
}

/// Under GC, outputs already fetched vanish from the builders, so jobs that share an input
/// often find it missing at the same moment and push it to the same builder concurrently:
/// the second push then meets a path that became valid after nixmux asked. Nix 2.8's
/// `nix-daemon` does not consume the NAR of an entry of `AddMultipleToStore` whose path is
/// already valid (`LocalStore::addToStore` skips reading it; `Store::addMultipleToStore`,
/// src/libstore/store-api.cc, goes on to read the next entry from the NAR), so such a push
/// fails with "not an absolute path: 'nix-archive-1'". nixmux therefore pushes with framed
/// `AddToStoreNar` per path, which the daemon drains whatever it read (this test failed about
/// one run in ten before). `nix-store --serve` is not affected: `cmdAddToStoreNar` drains
/// the NAR (src/nix-store/nix-store.cc).
#[test]
fn a_forty_derivation_graph_builds_while_every_builder_collects_garbage() {
    farm(true);
}

/// The same when the impossible derivation is one leaf of a graph whose other leaves could be
/// built: nothing may start, since the graph can never complete.
#[test]
fn an_impossible_derivation_inside_a_graph_fails_before_anything_is_built() {
    let rig = start_rig();
    let tmp = tempfile::tempdir().expect("tmp");
    let machines = tmp.path().join("machines");
    machines_file(&rig, &machines);
    let expr = expression(&graph(), "0.4");
    fails_at_once(
        &rig,
        &machines,
        &tmp.path().join("logs"),
        &expr,
        "in-graph",
        "benchmark",
    );
}
