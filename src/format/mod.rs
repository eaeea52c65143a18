//! Output formats: the docker-load archive of the squashed image, the image a registry serves
//! (config and manifests), and the appc ACI.

pub mod aci;
pub mod docker_archive;
pub mod image;
