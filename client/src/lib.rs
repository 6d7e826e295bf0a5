//! The client of the tie inference server.
//!
//! A trading process opens a [`Client`] session with a server on the same host, writes
//! fixed-layout feature frames into a shared-memory request ring and reads predictions from a
//! response ring. Neither [`Client::submit`] nor [`Client::poll`] blocks, allocates or makes a
//! system call on the hot path; [`Client::predict`] sends one request and waits for its answer.
//!
//! ```no_run
//! use tie_client::{Client, ConnectOptions};
//!
//! let mut client = Client::connect("tie", "mlp64", ConnectOptions::default())?;
//! let features = vec![0.0f32; client.feature_count() as usize];
//! let prediction = client.predict(&features)?;
//! println!("score {}", prediction.outputs()[0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Key types: [`Client`], [`ConnectOptions`], [`Response`], [`Prediction`], [`WaitStrategy`];
//! errors [`ConnectError`], [`SubmitError`], [`PredictError`]. The shared-memory ABI is the
//! `tie-layouts` crate, re-exported as [`layouts`]; [`segment`] maps session segments for both
//! the client and the server.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod client;
pub mod clock;
pub mod endpoint;
mod error;
mod handshake;
pub mod inspect;
pub mod segment;
mod wait;
mod words;

pub use client::{Backoff, Client, ConnectOptions, Prediction, Priority, RequestId, Response};
pub use clock::monotonic_ns;
pub use error::{each_cause_once, ConnectError, PredictError, ServerError, SubmitError};
pub use tie_layouts as layouts;
pub use tie_layouts::abi::Status;
pub use wait::WaitStrategy;
