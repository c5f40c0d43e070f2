//! The flash-attention and MoE kernel files run on the CPU, as written,
//! through `aha_cuda_kernels::emulate` (each CUDA thread a fiber; barriers,
//! shuffles, ballots and `mma.sync` emulated from the PTX fragment layouts).
//! The driver programs `emulate/flash.cpp` and `emulate/moe.cpp` check every
//! kernel of their file against plain double-precision references (flash:
//! forward, backward, tensor-core paths, paged decode with splits; MoE:
//! routing with ties, counts / scan / stable scatter, gather, combine, the
//! backward kernels, both grouped-product paths with empty experts and long
//! segments) and exit non-zero on any mismatch. This checks indexing,
//! masking, tie breaking and barrier placement on machines without a GPU;
//! not the launchers' argument lists, memory ordering or speed. Skipped only
//! where no C++ compiler exists and `AHA_REQUIRE_EMULATOR` is not 1
//! (scripts/test.sh sets it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_cuda_kernels::emulate;

fn run_self_checking(test: &str, program: &str, ok_marker: &str) {
    let Some(e) = emulate::emulator_for_test(test, program).unwrap_or_else(|err| panic!("{test}: {err}")) else {
        return;
    };
    let out = e.run_raw("").unwrap_or_else(|err| panic!("{test}: {err}"));
    eprintln!("{out}");
    assert!(out.contains(ok_marker), "{test}: no {ok_marker:?} in:\n{out}");
}

#[test]
fn flash_kernels_match_naive_attention_emulated() {
    run_self_checking("flash_kernels_match_naive_attention_emulated", "flash", "all ok");
}

#[test]
fn moe_kernels_match_references_emulated() {
    run_self_checking("moe_kernels_match_references_emulated", "moe", ", 0 failed");
}

/// The sanitized build (`AHA_EMU_SANITIZE=1`, which scripts/test.sh runs
/// over the kernel emulation tests) must catch an out-of-bounds read in a
/// kernel: the canary job runs the rmsnorm kernel over a buffer one float
/// short. The plain build of the same job runs to the end, so it is the
/// sanitizer, not the job, that fails.
#[test]
fn sanitized_emulator_catches_an_out_of_bounds_read() {
    use aha_cuda_kernels::emulate::{EmulateError, Emulator};
    if emulate::unavailable_reason().is_some() && !emulate::required() {
        eprintln!("sanitized_emulator_catches_an_out_of_bounds_read: skipped: no C++ compiler");
        return;
    }
    let plain = Emulator::build_with("core", false).unwrap();
    plain
        .run_raw("canary")
        .expect("the plain build runs the canary to the end");
    let sanitized = Emulator::build_with("core", true).unwrap();
    match sanitized.run_raw("canary") {
        Err(EmulateError::Run { msg, .. }) => {
            assert!(
                msg.contains("heap-buffer-overflow"),
                "sanitizer report expected:\n{msg}"
            )
        }
        other => panic!("the sanitized canary must fail, got {other:?}"),
    }
}
