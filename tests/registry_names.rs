//! What a registry-view name and tag mean over time: `--registry-alias` for a registry whose port
//! cannot be written in a repository path, and a tag that moves upstream (a new conversion, the old
//! one still served by digest).

mod common;

use common::images;
use common::pull::docker_layers;
use common::view::*;
use common::*;

#[test]
fn an_alias_names_a_registry_with_a_port() {
    let env = env();
    let source = publish(&env, "alias", images::whiteouts());
    let want = oracle(&source);
    // No --default-registry: only the alias reaches the test registry (allowed as insecure).
    let alias = format!("local={}", env.registry);
    let view = View::of(Server::start(&env.registry, &["--registry-alias", &alias]));
    let pulled = format!("{}/squash/local/fixtures/alias:v1", view.host);
    run(docker().args(["pull", "-q", &pulled]));
    assert_eq!(docker_layers(&pulled), 1);
    assert_same(&want, &export_listing(&pulled), &pulled);
    // The alias is the repository's first component only: elsewhere it is a plain path.
    let url = view.url("squash/fixtures/local/manifests/v1");
    let (status, _, _) = curl(&["-H", &format!("Accept: {OCI_MANIFEST}"), &url]);
    assert_ne!(status, 200, "{url} resolved through the alias");
}

#[test]
fn a_moved_tag_converts_again_and_the_old_conversion_stays_by_digest() {
    let env = env();
    let view = View::logging(&env.registry, "info");
    publish(&env, "moved", images::basic());
    let (_, first) = view.converted("moved", "v1");
    let source = publish(&env, "moved", images::whiteouts());
    let (_, second) = view.converted("moved", "v1");
    assert_ne!(
        first, second,
        "the tag moved upstream, its conversion did not"
    );
    assert_eq!(view.conversions(), 2);
    // The first conversion is still there by digest; the tag names the second.
    let (status, _, _) = view.manifest("moved", &first, OCI_MANIFEST);
    assert_eq!(status, 200);
    let pulled = view.reference("moved", "v1");
    run(docker().args(["pull", "-q", &pulled]));
    assert_same(&oracle(&source), &export_listing(&pulled), &pulled);
    let tag = std::fs::read_to_string(
        view.store()
            .join("repositories/squash/fixtures/moved/_tags/v1"),
    )
    .unwrap();
    assert_eq!(tag.trim(), second);
}
