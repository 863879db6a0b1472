//! Builds the kernel libraries and the Rust bindings.
//!
//! - `liblora_kernels_emu.a`: every `cuda/*.cu` (kernels + launchers) and the SIMT emulator runtime
//!   `cuda/emu/*.cpp`, compiled by the host C++ compiler with `-DLK_BACKEND_EMU`. Always built.
//!   `LK_EMU_SANITIZE=address` builds it (and links the test binaries) with AddressSanitizer and UBSan's
//!   alignment check (a misaligned access faults on a GPU, so the emulator must refuse it too).
//! - `liblora_kernels_cuda.a` (feature `cuda`): the same `cuda/*.cu` compiled by nvcc with
//!   `-DLK_BACKEND_CUDA` (sm_80 + sm_90 SASS, compute_90 PTX; `LK_CUDA_ARCHS=90` narrows it), linked
//!   with `cudart_static`. The ptxas report (`-Xptxas -v`) is kept beside it for the spill gate.
//! - Rust bindings from `cuda/lora_kernels.h` (+ `cuda/selftest.h`) by bindgen: no layout typed twice.
//!
//! Both libraries are cached under `<target>/lk-kernel-cache/<name>-<hash>/`, keyed by a hash of
//! every file under `cuda/`, the flags and the compiler's version, so clippy, test and bench builds
//! (different profiles and feature sets) compile the kernels once.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

const NVCC_SETUP_HINT: &str =
    "run `bash scripts/setup.sh` (installs the pinned CUDA 13.0 compiler wheels \
into .venv-cuda/), or point NVCC / CUDA_HOME at an existing CUDA 13.0 toolkit";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cuda_dir = root.join("cuda");

    let mut sources = Vec::new();
    collect_files(&cuda_dir, &mut sources);
    sources.sort();
    for f in &sources {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "PATH",
        "LK_CUDA_ARCHS",
        "LK_EMU_SANITIZE",
        "LK_KERNEL_CACHE",
        "LK_STATIC_LIBSTDCXX",
        "LK_CUDA_PTX",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let kernel_files: Vec<PathBuf> = sources
        .iter()
        .filter(|p| {
            p.parent() == Some(cuda_dir.as_path()) && p.extension().is_some_and(|e| e == "cu")
        })
        .cloned()
        .collect();
    let emu_runtime: Vec<PathBuf> = sources
        .iter()
        .filter(|p| {
            p.parent() == Some(cuda_dir.join("emu").as_path())
                && p.extension().is_some_and(|e| e == "cpp")
        })
        .cloned()
        .collect();
    let cache_root = cache_root(&out_dir);

    build_emu(
        &cuda_dir,
        &kernel_files,
        &emu_runtime,
        &sources,
        &cache_root,
    );
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda(&cuda_dir, &kernel_files, &sources, &cache_root, &out_dir);
    }
    generate_bindings(&cuda_dir, &out_dir);
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// `<target>/lk-kernel-cache`, shared by every profile and feature set (OUT_DIR is
/// `<target>/[<triple>/]<profile>/build/<pkg>-<hash>/out`).
fn cache_root(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("LK_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR has the cargo layout");
    let target_dir = profile_dir.parent().expect("profile dir has a parent");
    target_dir.join("lk-kernel-cache")
}

fn hash_inputs(sources: &[PathBuf], extra: &[String]) -> String {
    let mut h = DefaultHasher::new();
    for f in sources {
        f.file_name().hash(&mut h);
        fs::read(f).expect("read kernel source").hash(&mut h);
    }
    extra.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn tool_version(tool: &Path) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Returns the cache directory holding `lib<name>.a`, building it with `build` (into a private
/// temporary directory renamed into place, so concurrent cargo invocations never see half a library).
fn cached(cache_root: &Path, name: &str, hash: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let dir = cache_root.join(format!("{name}-{hash}"));
    if dir.join(format!("lib{name}.a")).exists() {
        return dir;
    }
    fs::create_dir_all(cache_root).expect("create kernel cache");
    let tmp = cache_root.join(format!("{name}-{hash}.tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).expect("create kernel cache tmp");
    build(&tmp);
    if fs::rename(&tmp, &dir).is_err() {
        // Another build finished first with the same inputs: use theirs.
        let _ = fs::remove_dir_all(&tmp);
    }
    assert!(
        dir.join(format!("lib{name}.a")).exists(),
        "kernel library missing after build: {}",
        dir.display()
    );
    dir
}

fn build_emu(
    cuda_dir: &Path,
    kernels: &[PathBuf],
    runtime: &[PathBuf],
    all: &[PathBuf],
    cache_root: &Path,
) {
    let sanitize = env::var("LK_EMU_SANITIZE").unwrap_or_default();
    let asan = match sanitize.as_str() {
        "" | "none" => false,
        "address" => true,
        other => panic!("LK_EMU_SANITIZE={other}: only `address` is supported"),
    };
    let probe = cc::Build::new().cpp(true).get_compiler();
    let mut flags: Vec<String> = [
        "-std=c++17",
        "-O2",
        "-g",
        "-fPIC",
        "-DLK_BACKEND_EMU",
        "-Wall",
        "-Wextra",
        "-Wno-unknown-pragmas",
        "-Wno-unused-parameter",
        // Probe every page of a large frame: a frame bigger than a fiber stack's guard then hits the
        // guard (LK_ERR_EMU_STACK_OVERFLOW) instead of jumping over it into a neighbour's stack.
        "-fstack-clash-protection",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if asan {
        // AddressSanitizer, plus UBSan's alignment check: on x86 a misaligned vector or scalar
        // access just works, on a GPU it is a fault (misaligned address), so the emulator must
        // refuse it too.
        flags.extend(
            [
                "-fsanitize=address,alignment",
                "-fno-sanitize-recover=alignment",
                "-fno-omit-frame-pointer",
            ]
            .map(String::from),
        );
    }
    let mut key = flags.clone();
    key.push(tool_version(probe.path()));
    let hash = hash_inputs(all, &key);
    let dir = cached(cache_root, "lora_kernels_emu", &hash, |tmp| {
        let compile = |files: &[PathBuf], subdir: &str, as_cxx: bool| {
            let mut b = cc::Build::new();
            b.cpp(true)
                .cargo_metadata(false)
                .out_dir(tmp.join(subdir))
                .include(cuda_dir)
                .warnings(false);
            // cc adds its own -O/-g; ours come last and win.
            for f in &flags {
                b.flag(f);
            }
            b.warnings_into_errors(true);
            if as_cxx {
                // g++ does not know `.cu`: `-x c++` must precede the file.
                b.flag("-x").flag("c++");
            }
            for f in files {
                b.file(f);
            }
            b.try_compile_intermediates()
                .unwrap_or_else(|e| panic!("compile {subdir} for the emulator: {e}"))
        };
        let mut objects = compile(runtime, "runtime", false);
        objects.extend(compile(kernels, "kernels", true));
        archive(&tmp.join("liblora_kernels_emu.a"), &objects);
    });
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static=lora_kernels_emu");
    println!("cargo::rustc-check-cfg=cfg(lk_emu_asan)");
    if asan {
        println!("cargo:rustc-cfg=lk_emu_asan");
        // rustc links with -nodefaultlibs, so -fsanitize=address alone would not pull the runtime in;
        // named before libstdc++ so that it comes first among the shared libraries.
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-link-lib=dylib=ubsan");
    }
    link_libstdcxx();
    println!("cargo:rustc-env=LK_EMU_LIB_DIR={}", dir.display());
}

/// libstdc++ for the C++ runtime: dynamic by default; static with `LK_STATIC_LIBSTDCXX=1` (the GPU
/// kit, whose binaries run on a machine with another toolchain).
fn link_libstdcxx() {
    if env::var("LK_STATIC_LIBSTDCXX").is_ok_and(|v| v == "1") {
        let compiler = cc::Build::new().cpp(true).get_compiler();
        let out = Command::new(compiler.path())
            .arg("-print-file-name=libstdc++.a")
            .output()
            .expect("ask g++ for libstdc++.a");
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.is_absolute() && path.exists(),
            "LK_STATIC_LIBSTDCXX=1 but libstdc++.a was not found"
        );
        println!(
            "cargo:rustc-link-search=native={}",
            path.parent().unwrap().display()
        );
        println!("cargo:rustc-link-lib=static=stdc++");
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}

fn archive(lib: &Path, objects: &[PathBuf]) {
    let _ = fs::remove_file(lib);
    let status = Command::new("ar")
        .arg("crs")
        .arg(lib)
        .args(objects)
        .status()
        .expect("run ar");
    assert!(status.success(), "ar failed for {}", lib.display());
}

/// nvcc, in the documented order: NVCC; the project-local pinned install; CUDA_HOME / CUDA_PATH /
/// CUDA_ROOT; PATH; /usr/local/cuda.
fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!("NVCC={} does not exist", p.display()))
        };
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let mut candidates =
        vec![root.join(".venv-cuda/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc")];
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("feature `cuda` needs nvcc and none was found: {NVCC_SETUP_HINT}"))
}

fn cuda_archs() -> Vec<String> {
    let list = env::var("LK_CUDA_ARCHS").unwrap_or_else(|_| "80,90".to_string());
    let archs: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for a in &archs {
        assert!(
            a.chars().all(|c| c.is_ascii_digit()),
            "LK_CUDA_ARCHS={list}: expected numbers like 80,90"
        );
    }
    assert!(!archs.is_empty(), "LK_CUDA_ARCHS is empty");
    archs
}

fn build_cuda(
    cuda_dir: &Path,
    kernels: &[PathBuf],
    all: &[PathBuf],
    cache_root: &Path,
    out_dir: &Path,
) {
    let nvcc = match find_nvcc() {
        Ok(p) => p,
        Err(msg) => {
            // One clear error, not a wall of linker noise.
            eprintln!("error: {msg}");
            panic!("{msg}");
        }
    };
    let archs = cuda_archs();
    let newest = archs
        .iter()
        .max_by_key(|a| a.parse::<u32>().unwrap())
        .unwrap()
        .clone();
    let mut flags: Vec<String> = [
        "-std=c++17",
        "-O3",
        "-lineinfo",
        "-DLK_BACKEND_CUDA",
        "-Xcompiler=-fPIC",
        "-Xptxas=-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in &archs {
        flags.push(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    // PTX for the newest arch lets future GPUs JIT the kernels; LK_CUDA_PTX=0 leaves it out (the GPU
    // kit, whose binaries run on one known GPU and must stay small).
    if env::var("LK_CUDA_PTX").map_or(true, |v| v != "0") {
        flags.push(format!(
            "-gencode=arch=compute_{newest},code=compute_{newest}"
        ));
    }
    let mut key = flags.clone();
    key.push(tool_version(&nvcc));
    let hash = hash_inputs(all, &key);
    let dir = cached(cache_root, "lora_kernels_cuda", &hash, |tmp| {
        let jobs = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let mut objects = Vec::new();
        let mut report = String::new();
        for chunk in kernels.chunks(jobs) {
            let children: Vec<_> = chunk
                .iter()
                .map(|src| {
                    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let obj = tmp.join(format!("{stem}.o"));
                    let child = Command::new(&nvcc)
                        .args(&flags)
                        .arg("-I")
                        .arg(cuda_dir)
                        .arg("-c")
                        .arg(src)
                        .arg("-o")
                        .arg(&obj)
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap_or_else(|e| panic!("spawn {}: {e}", nvcc.display()));
                    (src.clone(), obj, child)
                })
                .collect();
            for (src, obj, child) in children {
                let out = child.wait_with_output().expect("wait for nvcc");
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() {
                    panic!(
                        "nvcc failed on {}:\n{}{}",
                        src.display(),
                        String::from_utf8_lossy(&out.stdout),
                        stderr
                    );
                }
                report.push_str(&format!(
                    "# {}\n",
                    src.file_name().unwrap().to_string_lossy()
                ));
                report.push_str(&stderr);
                objects.push(obj);
            }
        }
        fs::write(tmp.join("ptxas-report.txt"), report).expect("write ptxas report");
        archive(&tmp.join("liblora_kernels_cuda.a"), &objects);
    });
    let report = dir.join("ptxas-report.txt");
    fs::copy(&report, out_dir.join("ptxas-report.txt")).expect("copy ptxas report");
    println!("cargo:rustc-env=LK_PTXAS_REPORT={}", report.display());
    println!("cargo:rustc-env=LK_CUDA_LIB_DIR={}", dir.display());
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static=lora_kernels_cuda");
    // cudart_static lives beside nvcc in the toolkit (lib64/) or the wheel (lib/).
    let toolkit = nvcc
        .parent()
        .and_then(Path::parent)
        .expect("nvcc is in <toolkit>/bin");
    let libdir = ["lib64", "lib", "lib/x64", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| toolkit.join(d))
        .find(|d| d.join("libcudart_static.a").exists())
        .unwrap_or_else(|| {
            panic!(
                "libcudart_static.a not found under {}: {NVCC_SETUP_HINT}",
                toolkit.display()
            )
        });
    println!("cargo:rustc-link-search=native={}", libdir.display());
    println!("cargo:rustc-link-lib=static=cudart_static");
    for lib in ["rt", "pthread", "dl"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

fn generate_bindings(cuda_dir: &Path, out_dir: &Path) {
    let mut builder = bindgen::Builder::default()
        .header(cuda_dir.join("lora_kernels.h").to_string_lossy())
        .clang_arg(format!("-I{}", cuda_dir.display()))
        .allowlist_type("Lk.*")
        .allowlist_function("lk_.*")
        .allowlist_var("LK_.*")
        .constified_enum_module("LkDtype")
        .derive_default(true)
        .derive_debug(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    let selftest = cuda_dir.join("selftest.h");
    if selftest.exists() {
        builder = builder.header(selftest.to_string_lossy());
    }
    builder
        .generate()
        .expect("bindgen on cuda/lora_kernels.h (needs libclang: bash scripts/setup.sh)")
        .write_to_file(out_dir.join("bindings.rs"))
        .expect("write bindings");
}
