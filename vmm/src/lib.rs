//! mempower's VMM as a library: the `mempower` binary is a thin wrapper around
//! [`cli::main`]; benches and fuzz targets link the pieces they exercise.

pub mod acpi;
pub mod agent;
pub mod autopilot;
pub mod boot;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod evacuation;
pub mod event_loop;
pub mod host_numa;
pub mod host_signals;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod pool;
pub mod seccomp;
pub mod stop;
pub mod sync;
#[cfg(test)]
mod test_child;
pub mod threads;
pub mod vm;
