//! The integration tests, one binary: real `tie serve` processes, real clients (this binary
//! re-run as child processes, the C API, the CLI), onnxruntime's answers as the oracle.
//! Skips are counted (see `common::skip`).

mod common;

mod backends;
mod batching;
mod c_api;
mod clickhouse;
mod config_errors;
mod conformance;
mod doctor;
mod e2e;
mod exported;
mod gpu;
mod http;
mod huge_pages;
mod journal;
mod load_failures;
mod loadgen;
mod models;
mod oip;
mod pipeline;
mod python_client;
mod reliability;
mod remote;
mod routing;
mod security;
