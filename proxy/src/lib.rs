//! The node-local L7 proxy.
