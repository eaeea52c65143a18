//! Resolving a request into a planned conversion (the image, its name and validator, none of its
//! layers read), then preparing it (sized, its body ready to start, teed into the store when there
//! is one); signatures kept for ACIs.

use sha2::{Digest as _, Sha256};

use super::bound::Sizing;
use super::cached;
use super::job::{Job, Output, Signing};
use super::prepass::prepass_parallelism;
use super::{
    AciRequest, AciSignature, Converter, Error, Planned, PlannedAci, Prepared, PreparedAci,
    SquashRequest, SIGNATURE_WAIT,
};
use crate::format::aci::{self, AciArchive, Identity, ManifestPlan};
use crate::format::docker_archive::DockerArchive;
use crate::manifest::ResolvedImage;
use crate::sign::{InFlight, Signer};
use crate::version;

impl Converter {
    /// Resolves and sizes the image; the returned body streams the bytes.
    pub async fn prepare(&self, request: SquashRequest) -> Result<Prepared, Error> {
        let planned = self.plan(request).await?;
        self.prepare_planned(planned).await
    }

    /// Resolves the image and names its bytes, reading no layer: enough to answer a matching
    /// `If-None-Match`.
    pub async fn plan(&self, request: SquashRequest) -> Result<Planned, Error> {
        let SquashRequest {
            reference,
            platform,
            tag,
            credentials,
        } = request;
        let repo_tag = match tag {
            Some(t) => {
                let parsed = self.parse_reference(&t)?;
                if parsed.digest.is_some()
                    || !t.contains(':')
                    || t.rsplit(':').next().is_some_and(|s| s.contains('/'))
                {
                    return Err(Error::BadRequest(format!("tag {t:?} must be name:tag")));
                }
                Some(t)
            }
            None => reference.tag.as_ref().map(|_| reference.familiar()),
        };
        let alive = self.conversions.start();
        let image = self.resolve(&reference, &platform, &credentials).await?;
        let sizing = self.sizing(&image);
        let id = hex::encode(Sha256::digest(format!(
            "{}\nsquash\n{}",
            version::OUTPUT,
            image.manifest_digest
        )));
        let etag = hex::encode(Sha256::digest(format!(
            "{id}\n{}\n{}",
            repo_tag.as_deref().unwrap_or(""),
            sizing.tag()
        )));
        let key = cached::squash_key(
            &image.manifest_digest,
            repo_tag.as_deref(),
            &reference.name(),
        );
        Ok(Planned {
            etag,
            id,
            repo_tag,
            reference,
            credentials,
            image,
            sizing,
            key,
            lease: None,
            alive,
        })
    }

    /// Sizes a planned squash: remembered, else an upper bound from the blobs' ends, or for an image
    /// that needs its summaries (its merge without them stopped, or it outgrew its bound), exactly
    /// from every layer's summary. The body starts the conversion when first polled.
    pub async fn prepare_planned(&self, planned: Planned) -> Result<Prepared, Error> {
        let Planned {
            etag,
            id,
            repo_tag,
            reference,
            credentials,
            image,
            sizing,
            key,
            lease,
            alive,
        } = planned;
        // Only an image whose merge without them stopped once has its summaries read, all of them
        // before the first byte (they size it); the others stream as their layers are read.
        let summaries = (sizing == Sizing::Exact)
            .then(|| self.summaries(&image, &credentials, &alive, prepass_parallelism(), None));
        let layer_size = match (sizing, &summaries) {
            (Sizing::Known(size), _) => size,
            (Sizing::Exact, Some(summaries)) => self.exact_size(&image, summaries).await?,
            _ => self.bound(&image, &credentials, &alive).await?,
        };
        let source = format!("{}@{}", reference.name(), image.manifest_digest);
        let archive = DockerArchive::new(id, layer_size, image.config.clone(), repo_tag, source);
        let content_length = archive.total_len();
        tracing::info!(
            image = %reference,
            manifest = %image.manifest_digest,
            layers = image.layers.len(),
            layer_size,
            sizing = sizing.tag(),
            content_length,
            "prepared"
        );

        let job = Job {
            source: self.source.clone(),
            store: self.store.clone(),
            reference,
            credentials,
            image,
            summaries,
            output: Output::Docker {
                archive,
                bounded: sizing == Sizing::Bound,
            },
            limits: self.config.limits,
            _alive: alive,
        };
        let body = job.start(self.tee(&key, Some(content_length), Some(&etag), lease));
        Ok(Prepared {
            content_length,
            etag,
            body,
        })
    }

    fn aci_identity(
        &self,
        request: &AciRequest,
        image: &ResolvedImage,
    ) -> Result<(Identity, String), Error> {
        let name = if aci::names::is_ac_identifier(&request.name) {
            request.name.clone()
        } else {
            aci::names::sanitize_ac_identifier(&request.name).ok_or_else(|| {
                Error::BadRequest(format!("{:?} cannot be an appc name", request.name))
            })?
        };
        let version = request
            .version
            .clone()
            .or_else(|| request.reference.tag.clone())
            // A reference by digest alone names no tag; the digest is what it is known by.
            .unwrap_or_else(|| image.manifest_digest.to_string());
        let arch = aci::names::appc_arch(
            &image.platform.architecture,
            image.platform.variant.as_deref(),
        )
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{}: appc has no name for the architecture {}",
                request.reference, image.platform
            ))
        })?;
        if image.platform.os != "linux" {
            return Err(Error::NotFound(format!(
                "{}: only linux images become ACIs, not {}",
                request.reference, image.platform.os
            )));
        }
        let identity = Identity {
            name,
            version,
            os: image.platform.os.clone(),
            arch: arch.to_string(),
            registry: request.reference.registry.clone(),
            repository: request.reference.repository.clone(),
            manifest_digest: image.manifest_digest.to_string(),
            config_digest: image.config_digest.to_string(),
        };
        let etag = hex::encode(Sha256::digest(format!(
            "{}\naci\n{}\n{}\n{}\n{}\n{}",
            version::OUTPUT,
            identity.manifest_digest,
            identity.name,
            identity.version,
            identity.os,
            identity.arch
        )));
        Ok((identity, etag))
    }

    /// Resolves the image and plans its manifest; the returned body streams the ACI and, at its end,
    /// keeps its signature.
    pub async fn prepare_aci(&self, request: AciRequest) -> Result<PreparedAci, Error> {
        let planned = self.plan_aci(request).await?;
        self.prepare_planned_aci(planned).await
    }

    /// Resolves the image and plans the ACI's manifest, reading no layer: its validator is known.
    pub async fn plan_aci(&self, request: AciRequest) -> Result<PlannedAci, Error> {
        let alive = self.conversions.start();
        let image = self
            .resolve(&request.reference, &request.platform, &request.credentials)
            .await?;
        let (identity, etag) = self.aci_identity(&request, &image)?;
        let key = cached::aci_key(&identity);
        let plan = ManifestPlan::new(&image.config, identity.clone())
            .map_err(|e| Error::InvalidImage(format!("{}: as an ACI: {e}", request.reference)))?;
        Ok(PlannedAci {
            etag,
            name: identity.name,
            plan,
            request,
            image,
            key,
            lease: None,
            alive,
        })
    }

    /// Reads what the merge needs to know ahead (remembered, or a pre-pass); the body starts the
    /// conversion when first polled.
    pub async fn prepare_planned_aci(&self, planned: PlannedAci) -> Result<PreparedAci, Error> {
        let PlannedAci {
            etag,
            name,
            plan,
            request,
            image,
            key,
            lease,
            alive,
        } = planned;
        // An ACI needs no size ahead: only an image whose merge without them stopped once has its
        // summaries read, one layer ahead of the merge.
        let summaries = self.summaries_if_needed(&image, &request.credentials, &alive);
        if let Some(summaries) = &summaries {
            summaries.top().await?;
        }
        tracing::info!(
            image = %request.reference,
            manifest = %image.manifest_digest,
            %name,
            layers = image.layers.len(),
            "prepared ACI"
        );
        let signing = self.config.signer.as_ref().map(|signer| Signing {
            signer: signer.clone(),
            signatures: self.signatures.clone(),
            in_flight: self.signatures.start(&signer.key_id(&etag)),
        });
        let job = Job {
            source: self.source.clone(),
            store: self.store.clone(),
            reference: request.reference,
            credentials: request.credentials,
            image,
            summaries,
            output: Output::Aci {
                archive: Box::new(AciArchive::new(plan)),
                signing,
            },
            limits: self.config.limits,
            _alive: alive,
        };
        Ok(PreparedAci {
            etag,
            name,
            body: job.start(self.tee(&key, None, None, lease)),
        })
    }

    /// The ACI's detached signature: kept from an earlier conversion, or awaited from one under way.
    /// `Ok(None)` when this service signs nothing.
    pub async fn aci_signature(&self, request: &AciRequest) -> Result<Option<AciSignature>, Error> {
        let Some(signer) = &self.config.signer else {
            return Ok(None);
        };
        let image = self
            .resolve(&request.reference, &request.platform, &request.credentials)
            .await?;
        let (_, etag) = self.aci_identity(request, &image)?;
        let key = signer.key_id(&etag);
        let deadline = tokio::time::Instant::now() + SIGNATURE_WAIT;
        loop {
            if let Some(sig) = self.signatures.load(&key) {
                return Ok(Some(AciSignature::Ready(sig)));
            }
            if !self.signatures.in_flight(&key) || tokio::time::Instant::now() >= deadline {
                return Ok(Some(AciSignature::Pending { key }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Marks the signature under `key` as coming: requests for it wait while the guard lives.
    pub fn signature_in_flight(&self, key: &str) -> InFlight {
        self.signatures.start(key)
    }

    /// The public half of the signing key, armored.
    pub fn public_key(&self) -> Option<&str> {
        self.config.signer.as_deref().map(Signer::public_key)
    }
}
