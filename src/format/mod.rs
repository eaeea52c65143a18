//! Output formats: how a merged layer is packaged for the client that asked.

pub mod docker_archive;
