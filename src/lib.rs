//! tie: a low-latency inference server for trading processes on the same host.
//!
//! Clients (`tie-client`) write feature frames into shared-memory rings; the server's pollers
//! ([`server`]) validate them, batch them per model and run them on a [`backend::Backend`],
//! then write predictions back. Models come from a Triton-style repository ([`repository`]);
//! the service is configured by a TOML file ([`config`]).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod backend;
pub mod batch;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod gpu;
pub mod health;
pub mod http;
pub mod loadgen;
pub mod logging;
pub mod manager;
pub mod monitor;
pub mod profile;
pub mod report;
pub mod repository;
pub mod router;
pub mod server;
