//! Errors of the datapath loader: each names the object (map, program, interface, path) it is
//! about, and kernel shortcomings say what is missing and how to get it.
use std::{io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

/// What went wrong while loading, attaching or writing the datapath.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatapathError {
    /// The kernel or machine lacks a feature the datapath needs.
    #[error("the kernel lacks {what}: {hint}")]
    MissingKernelFeature {
        /// The feature.
        what: &'static str,
        /// How to get it, or what was found instead.
        hint: String,
    },
    /// The eBPF object could not be loaded (includes the verifier log when the verifier refused).
    #[error("loading the eBPF object: {0}")]
    Load(#[source] EbpfError),
    /// A map or program expected in the object is absent.
    #[error("{name} is not in the eBPF object (or was already taken)")]
    MissingObject {
        /// Its name.
        name: &'static str,
    },
    /// A program could not be loaded.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: MapError,
    },
    /// Attaching to or detaching from an interface failed.
    #[error("interface {ifname} ({hook}): {source}")]
    Attach {
        /// Interface.
        ifname: String,
        /// `ingress` or `egress`.
        hook: &'static str,
        /// Cause.
        #[source]
        source: ProgramError,
    },
    /// Opening or converting a pinned link failed.
    #[error("interface {ifname} ({hook}) pinned link: {source}")]
    Link {
        /// Interface.
        ifname: String,
        /// `ingress` or `egress`.
        hook: &'static str,
        /// Cause.
        #[source]
        source: LinkError,
    },
    /// Pinning a link failed.
    #[error("pinning {path}: {source}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: PinError,
    },
    /// A file-system operation under the pin root failed.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No interface has this name.
    #[error("no network interface named {0:?}")]
    NoSuchInterface(String),
    /// A policy entry breaks an invariant.
    #[error("invalid policy entry: {detail}")]
    InvalidEntry {
        /// Which invariant.
        detail: String,
    },
    /// An `ip` command of the redirect routing failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
}
