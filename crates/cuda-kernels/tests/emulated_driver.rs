//! The emulated GPU's driver refuses the launches an sm_90 device refuses,
//! with the codes the real driver returns, and reports a write past a
//! kernel's dynamic shared memory as a fault at the next synchronise (or at
//! the launch itself under `AHA_CUDA_SYNC=1`, through the launchers' error
//! helper). One test function, so that no other launch in this process
//! picks up the fault it provokes. Skipped only where no C++ compiler exists
//! and `AHA_REQUIRE_EMULATOR` is not 1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aha_cuda_kernels::cudarc::driver::sys::{CUfunction_attribute, CUresult};
use aha_cuda_kernels::cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};
use aha_cuda_kernels::cudarc::nvrtc::Ptx;
use aha_cuda_kernels::emulate::{self, EmulateError};
use aha_cuda_kernels::error::{with_context, Error};

fn code(r: Result<(), DriverError>) -> CUresult {
    match r {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(DriverError(c)) => c,
    }
}

fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}

#[test]
fn the_emulated_driver_refuses_what_an_h100_refuses() {
    match emulate::install_emulated_gpu() {
        Ok(()) => {}
        Err(EmulateError::NoCompiler(why)) if !emulate::required() => {
            eprintln!("the_emulated_driver_refuses_what_an_h100_refuses: skipped: {why}");
            return;
        }
        Err(e) => panic!("{e}"),
    }
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    // The emulated driver ignores the module image.
    let module = ctx.load_module(Ptx::from_binary(b"\x7fELF".to_vec())).unwrap();
    let n = 64usize;
    let mut buf = stream.clone_htod(&vec![1.0f32; n]).unwrap();

    // scale_f32(x, s, n): block and grid limits.
    let scale = module.load_function("scale_f32").unwrap();
    let launch_scale = |c: LaunchConfig, buf: &mut _| {
        let mut b = stream.launch_builder(&scale);
        let len = n as u64;
        let two = 2.0f32;
        b.arg(buf).arg(&two).arg(&len);
        // SAFETY: scale_f32(float* x, float s, unsigned long long n); x has n elements.
        code(unsafe { b.launch(c) }.map(|_| ()))
    };
    assert_eq!(launch_scale(cfg((1, 1, 1), 256, 0), &mut buf), CUresult::CUDA_SUCCESS);
    assert_eq!(
        launch_scale(cfg((1, 1, 1), 1025, 0), &mut buf),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        launch_scale(cfg((1, 65_536, 1), 256, 0), &mut buf),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        launch_scale(cfg((1, 1, 65_536), 256, 0), &mut buf),
        CUresult::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        launch_scale(cfg((1, 65_535, 1), 32, 0), &mut buf),
        CUresult::CUDA_SUCCESS
    );
    // Registers: 255 a thread is 8,192 a warp (units of 256), so 256
    // threads fit 65,536 and 288 do not.
    emulate::set_kernel_resources("scale_f32", 255, 0).unwrap();
    assert_eq!(launch_scale(cfg((1, 1, 1), 256, 0), &mut buf), CUresult::CUDA_SUCCESS);
    assert_eq!(
        launch_scale(cfg((1, 1, 1), 288, 0), &mut buf),
        CUresult::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    );

    // rmsnorm_backward_f32 with rows = 0 only zeroes c floats of dynamic
    // shared memory and copies them to partial[0, :c].
    let rms = module.load_function("rmsnorm_backward_f32").unwrap();
    let dummy = stream.clone_htod(&vec![0.0f32; n]).unwrap();
    let mut partial = stream.clone_htod(&vec![5.0f32; n]).unwrap();
    let mut launch_rms = |smem: u32| {
        let mut b = stream.launch_builder(&rms);
        b.arg(&mut buf)
            .arg(&mut partial)
            .arg(&dummy)
            .arg(&dummy)
            .arg(&dummy)
            .arg(&dummy);
        let (rows, c) = (0i32, n as i32);
        b.arg(&rows).arg(&c);
        // SAFETY: rmsnorm_backward_f32(dinp, partial, dout, inp, weight,
        // rstd, int rows, int c): with rows = 0 only partial[0..c] is written.
        unsafe { b.launch(cfg((1, 1, 1), 256, smem)) }.map(|_| ())
    };
    let kb = 1024u32;
    let attr = CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let static_smem = rms
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .unwrap() as u32;
    assert_eq!(rms.get_attribute(attr).unwrap() as u32, 48 * kb - static_smem);
    assert_eq!(
        code(launch_rms(48 * kb - static_smem)),
        CUresult::CUDA_SUCCESS,
        "48 KB less static"
    );
    assert_eq!(
        code(launch_rms(48 * kb - static_smem + 4)),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        "over 48 KB with the static part, without the attribute"
    );
    assert_eq!(
        code(launch_rms(64 * kb)),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        "64 KB without the attribute"
    );
    assert!(
        rms.set_attribute(attr, 228 * kb as i32).is_err(),
        "above the sm_90 maximum"
    );
    rms.set_attribute(attr, 64 * kb as i32).unwrap();
    assert_eq!(code(launch_rms(64 * kb)), CUresult::CUDA_SUCCESS, "64 KB once raised");
    assert_eq!(
        code(launch_rms(64 * kb + 4)),
        CUresult::CUDA_ERROR_INVALID_VALUE,
        "past the raised limit"
    );
    stream.synchronize().unwrap();

    // Writing 256 bytes into 32 of dynamic shared memory: the launch is
    // queued, the fault comes with the next synchronise, once.
    assert_eq!(code(launch_rms(32)), CUresult::CUDA_SUCCESS);
    assert_eq!(code(stream.synchronize()), CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
    stream.synchronize().unwrap();
    // With a synchronize after the launch (what AHA_CUDA_SYNC=1 does in
    // every launcher), the launch itself fails, naming the kernel.
    let err = with_context(launch_rms(32), "launch rmsnorm_backward_f32", true).unwrap_err();
    assert!(matches!(err, Error::KernelFault { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("rmsnorm_backward_f32") && msg.contains("ILLEGAL_ADDRESS"),
        "{msg}"
    );
    with_context(launch_rms(n as u32 * 4), "launch rmsnorm_backward_f32", true).unwrap();
    assert_eq!(stream.clone_dtoh(&partial).unwrap(), vec![0.0f32; n]);
}
