//! Loads libtorch's CUDA library when a model may run on a GPU.
//!
//! libtorch keeps CUDA in its own library, `libtorch_cuda.so`, which
//! registers itself when loaded; nothing in our binary calls into it, so
//! the linker drops it (`--as-needed`) and `tch::Cuda::is_available()` says
//! false on every machine. Linking it unconditionally would make every
//! worker on a machine without a GPU map a gigabyte of CUDA libraries at
//! start-up; instead it is opened here, from the directory the running
//! libtorch came from (so the versions always match), only where the NVIDIA
//! driver is present.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// The device node every CUDA process opens: without it no GPU is usable.
const DRIVER_NODE: &str = "/dev/nvidiactl";

/// What became of libtorch's CUDA library.
#[derive(Debug, PartialEq, Eq)]
pub enum CudaLibrary {
    /// Loaded (or already loaded): libtorch can see GPUs.
    Loaded,
    /// Not tried: no NVIDIA driver on this machine.
    NoDriver,
    /// This libtorch was built without CUDA.
    NotInLibtorch,
}

/// Opens `libtorch_cuda.so` beside the libtorch this process runs with.
/// Idempotent: the dynamic loader keeps one copy.
pub fn load() -> Result<CudaLibrary, String> {
    if !Path::new(DRIVER_NODE).exists() {
        return Ok(CudaLibrary::NoDriver);
    }
    open_beside_libtorch()
}

fn open_beside_libtorch() -> Result<CudaLibrary, String> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let Some(dir) = libtorch_dir(&maps) else {
        return Err("libtorch_cpu.so is not among this process's mappings".to_owned());
    };
    let library = dir.join("libtorch_cuda.so");
    if !library.exists() {
        return Ok(CudaLibrary::NotInLibtorch);
    }
    let path = CString::new(library.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte in its path", library.display()))?;
    // SAFETY: a valid C string; RTLD_NOW resolves every symbol now, so a
    // mismatched library fails here with a message, not later in a job.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local message or null.
        let reason = unsafe {
            let message = libc::dlerror();
            if message.is_null() {
                "unknown reason".to_owned()
            } else {
                CStr::from_ptr(message).to_string_lossy().into_owned()
            }
        };
        return Err(format!("cannot load {}: {reason}", library.display()));
    }
    // The handle is kept open for the life of the process on purpose.
    Ok(CudaLibrary::Loaded)
}

/// The directory of the `libtorch_cpu.so` mapped into this process.
fn libtorch_dir(maps: &str) -> Option<PathBuf> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent())
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libtorch_among_the_mappings() {
        let maps = "\
7f00-7f10 r--p 00000000 fd:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 r-xp 00001000 fd:01 456 /opt/torch/.venv/lib/python3.12/site-packages/torch/lib/libtorch_cpu.so
7f40-7f50 rw-p 00000000 00:00 0 [heap]
";
        assert_eq!(
            libtorch_dir(maps),
            Some(PathBuf::from(
                "/opt/torch/.venv/lib/python3.12/site-packages/torch/lib"
            ))
        );
        assert_eq!(
            libtorch_dir("7f00-7f10 r--p 0 fd:01 1 /lib/libc.so.6\n"),
            None
        );
        // A library whose name merely ends alike is not libtorch.
        assert_eq!(
            libtorch_dir("7f00-7f10 r--p 0 fd:01 1 /x/mylibtorch_cpu.so\n"),
            None
        );
    }

    #[test]
    fn opens_the_cuda_library_of_the_libtorch_in_use() {
        // The test binary links libtorch like the worker does; without a
        // driver the library still loads (CUDA then finds no device), which
        // is what this checks even on a machine without a GPU.
        let _ = tch::Cuda::device_count();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let dir = libtorch_dir(&maps).expect("libtorch is not mapped");
        match open_beside_libtorch() {
            Ok(CudaLibrary::Loaded) => {
                let after = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
                let cuda = dir.join("libtorch_cuda.so");
                assert!(
                    after.contains(&*cuda.to_string_lossy()),
                    "{cuda:?} not mapped"
                );
                // Twice is harmless.
                assert_eq!(open_beside_libtorch(), Ok(CudaLibrary::Loaded));
            }
            Ok(CudaLibrary::NotInLibtorch) => assert!(!dir.join("libtorch_cuda.so").exists()),
            other => panic!("{other:?}"),
        }
        match load() {
            Ok(CudaLibrary::NoDriver) => assert!(!Path::new(DRIVER_NODE).exists()),
            other => assert!(Path::new(DRIVER_NODE).exists(), "{other:?}"),
        }
    }
}
