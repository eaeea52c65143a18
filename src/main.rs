//! `strata`: parse flags, set up logging, then serve or convert once.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use strata::cli::{self, Cli, Command, LogFormat};
use strata::convert::{AciRequest, AciSignature, Converter, SquashRequest};
use strata::progress::Progress;
use strata::registry::Credentials;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logs = strata::progress::Stderr::default();
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logs.clone());
    match cli.log_format {
        // A log file or a pipe gets plain text, not escape codes.
        LogFormat::Text => log.with_ansi(stderr_is_terminal()).init(),
        // The event's fields at the top level beside `message`, and every span it is in (the
        // request's id, the conversion's image) in `spans`.
        LogFormat::Json => log
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime starts");
    match runtime.block_on(run(cli, logs)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

/// The CLI's bar of layer bytes read: drawn on a terminal, unless `--quiet`.
fn progress_bar(
    converter: &Converter,
    layer_bytes: u64,
    quiet: bool,
    logs: &strata::progress::Stderr,
) -> Progress {
    let shown = !quiet && stderr_is_terminal();
    Progress::new(converter.metrics().clone(), layer_bytes, shown, logs)
}

async fn run(cli: Cli, logs: strata::progress::Stderr) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            listen,
            max_concurrent,
            shutdown_grace,
            header_read_timeout,
            max_connections,
            public_name,
            public_url,
            signing,
            view,
            source,
        } => {
            let mut settings = cli::server_settings(cli::FrontArgs {
                max_concurrent,
                shutdown_grace,
                header_read_timeout,
                max_connections,
            })?;
            settings.public_name = public_name.as_deref().map(cli::public_name).transpose()?;
            settings.public_url = public_url;
            settings.registry_aliases = view.registry_alias;
            settings.manifest_wait = std::time::Duration::from_secs(view.manifest_wait);
            let mut config = source.converter_config(false)?;
            config.signer = signing.signer()?;
            config.store = view.store.or_else(|| {
                let dir = config.cache_dir.as_ref()?;
                Some(strata::store::Location::Dir(dir.join("store")))
            });
            config.wire_compression = view.layer_compression;
            config.store_max_bytes = (view.cache_max_bytes > 0).then_some(view.cache_max_bytes);
            config.gc_grace = std::time::Duration::from_secs(view.gc_grace);
            config.lease_ttl = std::time::Duration::from_secs_f64(view.lease_ttl);
            config.tarball_wait = std::time::Duration::from_secs(view.tarball_wait);
            if view.blob_redirect && !matches!(config.store, Some(strata::store::Location::S3(_))) {
                anyhow::bail!("--blob-redirect needs --store s3://…");
            }
            settings.blob_redirect = view.blob_redirect;
            settings.enable_delete = view.enable_delete;
            settings.hook_token = view
                .hook_token
                .map(strata::server::HookToken::new)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            if settings.hook_token.is_some() && config.store.is_none() {
                anyhow::bail!("--hook-token converts into the store: give --store or a cache dir");
            }
            let converter = Arc::new(Converter::new(config)?);
            if view.gc_interval > 0 && converter.image_store().is_some() {
                let interval = std::time::Duration::from_secs(view.gc_interval);
                tokio::spawn(converter.clone().collect_every(interval));
            }
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("strata: listening on http://{}", listener.local_addr()?);
            strata::server::run(listener, converter, settings, shutdown_signal()).await?;
            Ok(())
        }
        Command::Squash {
            reference,
            output,
            platform,
            tag,
            credentials_from_env,
            quiet,
            source,
        } => {
            let converter = Converter::new(source.converter_config(!credentials_from_env)?)?;
            let credentials = Credentials(if credentials_from_env {
                Some(cli::credentials_from_env()?)
            } else {
                None
            });
            let request = SquashRequest {
                reference: converter.parse_reference(&reference)?,
                platform: cli::platform(&platform)?,
                tag,
                credentials,
            };
            let failed = |e: strata::convert::Error| anyhow::anyhow!("{}: {e}", e.code());
            let planned = converter.plan(request.clone()).await.map_err(failed)?;
            let progress = progress_bar(&converter, planned.layer_bytes(), quiet, &logs);
            progress.phase("sizing");
            let prepared = converter
                .prepare_held(planned, request)
                .await
                .map_err(failed)?;
            progress.phase("converting");
            write_output(&output, prepared.body, Some(prepared.content_length)).await?;
            progress.finish();
            Ok(())
        }
        Command::Aci {
            reference,
            output,
            name,
            platform,
            signature,
            credentials_from_env,
            quiet,
            signing,
            source,
        } => {
            let mut config = source.converter_config(!credentials_from_env)?;
            config.signer = signing.signer()?;
            let converter = Converter::new(config)?;
            let credentials = Credentials(if credentials_from_env {
                Some(cli::credentials_from_env()?)
            } else {
                None
            });
            let reference = converter.parse_reference(&reference)?;
            let request = AciRequest {
                name: name.unwrap_or_else(|| reference.repository.clone()),
                version: None,
                reference,
                platform: cli::platform(&platform)?,
                credentials,
            };
            let failed = |e: strata::convert::Error| anyhow::anyhow!("{}: {e}", e.code());
            let planned = converter.plan_aci(request.clone()).await.map_err(failed)?;
            let progress = progress_bar(&converter, planned.layer_bytes(), quiet, &logs);
            progress.phase("scanning");
            let prepared = converter
                .prepare_held_aci(planned, request.clone())
                .await
                .map_err(failed)?;
            progress.phase("converting");
            write_output(&output, prepared.body, None).await?;
            progress.finish();
            if let Some(path) = signature {
                match converter.aci_signature(&request).await {
                    Ok(Some(AciSignature::Ready(sig))) => tokio::fs::write(&path, sig)
                        .await
                        .with_context(|| format!("writing {}", path.display()))?,
                    other => anyhow::bail!("no signature was made: {other:?}"),
                }
            }
            Ok(())
        }
        Command::Keygen {
            output,
            user_id,
            algorithm,
        } => {
            let key = strata::sign::generate(algorithm, &user_id)?;
            let public = format!("{}.pub", output.display());
            write_new(&output, key.secret.as_bytes(), 0o600)?;
            write_new(std::path::Path::new(&public), key.public.as_bytes(), 0o644)?;
            eprintln!(
                "strata: signing key {} written to {} (public key: {public})",
                key.fingerprint,
                output.display()
            );
            Ok(())
        }
        Command::SampleLayout { dir } => {
            strata::sample::write_layout(&dir)
                .with_context(|| format!("writing {}", dir.display()))?;
            eprintln!("strata: sample image written to {}; serve it with --oci-layout and ask for sample:latest", dir.display());
            Ok(())
        }
        Command::Healthcheck { url, timeout } => {
            // Blocking, on purpose: one short request, nothing else runs in this process.
            strata::healthcheck::check(&url, std::time::Duration::from_secs(timeout))?;
            Ok(())
        }
    }
}

/// Creates `path` with `mode`, refusing to overwrite: a key file is not something to lose.
fn write_new(path: &std::path::Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(data)?;
    file.sync_all()?;
    Ok(())
}

/// Streams the body to `output`; a file is written as `FILE.partial` and renamed only when complete,
/// so a failed conversion never leaves a complete-looking file.
async fn write_output(
    output: &str,
    mut body: strata::convert::ByteStream,
    expected: Option<u64>,
) -> anyhow::Result<()> {
    let complete = |written: u64| -> anyhow::Result<()> {
        match expected {
            Some(n) if n != written => {
                anyhow::bail!("conversion ended after {written} of {n} bytes")
            }
            _ => Ok(()),
        }
    };
    let mut written = 0u64;
    if output == "-" {
        let mut out = tokio::io::stdout();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("conversion failed")?;
            written += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
    } else {
        let partial = format!("{output}.partial");
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("creating {partial}"))?;
        let result: anyhow::Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("conversion failed")?;
                written += chunk.len() as u64;
                file.write_all(&chunk).await?;
            }
            file.sync_all().await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        if let Err(e) = complete(written) {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        tokio::fs::rename(&partial, output)
            .await
            .with_context(|| format!("renaming {partial}"))?;
    }
    complete(written)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received");
}
