//! Output formats: the docker-load archive of the squashed image, and the appc ACI.

pub mod aci;
pub mod docker_archive;
