//! Builds the kernel programs (`../ebpf`, its own cargo workspace) with the nightly toolchain
//! and `bpf-linker` through `aya-build`, and leaves the object in `OUT_DIR` for
//! `include_bytes_aligned!`. Run `scripts/setup-datapath.sh` once to install the toolchain.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../ebpf").canonicalize()?;
    let common_dir = manifest.join("../common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common_dir.display());
    share_ebpf_target_dir()?;
    // aya-build runs `cargo build --package …` in the current directory; the eBPF crate is a
    // workspace of its own, so run it from there (the root workspace does not list it).
    env::set_current_dir(&ebpf_dir)?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tollgate-datapath-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF programs failed ({e:#}); is the toolchain installed? \
             run scripts/setup-datapath.sh"
        )
    })
}

/// aya-build gives the nested eBPF build a cargo target dir inside this build script's
/// `OUT_DIR`, and cargo runs a separate instance of this script for every feature set and
/// profile the loader is built with (`build`, `test`, `clippy` of different packages…): each
/// would compile the eBPF crate and `core` from scratch (minutes). Point that directory at one
/// shared directory under the outer target dir instead, so the nested cargo finds its earlier
/// work fresh (it locks the directory itself, so concurrent builds wait rather than collide).
fn share_ebpf_target_dir() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // OUT_DIR = <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out
    let Some(target) = out.ancestors().nth(4) else {
        return Ok(());
    };
    let shared = target.join("tollgate-ebpf-build");
    let link = out
        .join("aya-build")
        .join("target")
        .join("tollgate-datapath-ebpf");
    if link.symlink_metadata().is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(&shared)?;
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::os::unix::fs::symlink(&shared, &link)?;
    Ok(())
}
