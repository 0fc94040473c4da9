//! Sharded clipping over MPI (`--features mpi`): this test starts itself under
//! `mpiexec -n 4` (and `-n 1`, and alone, a 1-rank world); every rank runs the checks of
//! `common/sharded.rs` on the CPU and on the GPU (lavapipe in CI), comparing the gathered
//! shards with the single-process clip. A rank that panics aborts the job (the panic
//! hook), and `timeout` bounds every mpiexec, so a failure never hangs.

mod common;

use std::process::Command;
use std::sync::Mutex;

use common::sharded::{check_all, On};
use gradclip::{Collective, GpuContext, MpiCollective};

const WORKER: &str = "GRADCLIP_MPI_WORKER";
/// Makes rank 2 panic before its first collective (the abort check).
const PANIC: &str = "GRADCLIP_MPI_PANIC";

fn worker() {
    MpiCollective::abort_on_panic();
    let comm = MpiCollective::init().expect("MPI");
    if std::env::var_os(PANIC).is_some() && comm.rank() == 2 {
        panic!("rank 2 panics on purpose");
    }
    check_all(&comm, On::Cpu);
    let ctx = GpuContext::with_backends(common::backends())
        .unwrap_or_else(|e| panic!("the MPI test needs a wgpu adapter (lavapipe): {e}"));
    let turns = Mutex::new(());
    check_all(&comm, On::Gpu(&ctx, &turns));
    comm.barrier();
    println!("rank {} of {}: ok", comm.rank(), comm.size());
}

/// Runs this binary under `timeout` as the worker of `ranks` MPI ranks (none: without
/// mpiexec), with `env` set.
fn run(ranks: Option<usize>, env: &[(&str, &str)]) -> std::process::Output {
    let me = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", "600"]);
    if let Some(n) = ranks {
        cmd.args(["mpiexec", "-n", &n.to_string()]);
    }
    cmd.arg(&me).env(WORKER, "1").envs(env.iter().copied());
    cmd.output()
        .expect("timeout and mpiexec (apt-get install mpich)")
}

/// Runs `ranks` workers and checks that every rank finished.
fn launch(ranks: Option<usize>) {
    let out = run(ranks, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let n = ranks.unwrap_or(1);
    let done = stdout.lines().filter(|l| l.ends_with(": ok")).count();
    assert!(
        out.status.success() && done == n,
        "{n} ranks: {} ({done} finished)\n{stdout}\n{stderr}",
        out.status
    );
    println!(
        "{n} ranks ({}): ok",
        if ranks.is_some() { "mpiexec" } else { "alone" }
    );
}

fn main() {
    if std::env::var_os(WORKER).is_some() {
        return worker();
    }
    launch(None);
    launch(Some(1));
    launch(Some(4));
    // A panicking rank ends the job at once (exit status not timeout's 124).
    let started = std::time::Instant::now();
    let out = run(Some(4), &[(PANIC, "1")]);
    let code = out.status.code();
    assert!(
        !out.status.success() && code != Some(124) && code != Some(137),
        "{code:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("on purpose"));
    println!(
        "a panicking rank aborted the job in {:?}: ok",
        started.elapsed()
    );
}
