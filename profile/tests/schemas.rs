//! The committed JSON Schemas in `schemas/` match the Rust types.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;

#[test]
fn schemas_are_fresh() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let mut stale = Vec::new();
    for (name, text) in edgetwin_profile::schema::schema_files() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        if committed != text {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/{} differ from the Rust types; refresh them with\n    cargo run -p edgetwin-profile --bin edgetwin-schemas -- schemas/\nand commit the result",
        stale.join(", schemas/")
    );
}

#[test]
fn schemas_offer_one_of_the_two_documents_to_editors() {
    let schema = edgetwin_profile::schema::profile_schema();
    let one_of = schema["oneOf"].as_array().unwrap();
    assert_eq!(one_of.len(), 2);
    assert_eq!(
        schema["definitions"]["DeviceModelKind"]["oneOf"][0]["const"],
        "DeviceModel"
    );
}
