//! docs/architecture.md cannot drift from the tree: every workspace crate
//! has a codemap row naming each of its modules, and a section with its
//! entry points (functions that exist) and its architecture invariant.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn architecture() -> Result<String> {
    std::fs::read_to_string(root().join("docs/architecture.md")).context("docs/architecture.md")
}

/// The workspace members, as their directories (`shared`, `examples/echo-bot`).
fn members() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let line = manifest
        .lines()
        .find(|line| line.starts_with("members"))
        .context("no members line in Cargo.toml")?;
    let members: Vec<String> = line
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    if members.len() < 5 {
        bail!("cannot read the members from {line:?}");
    }
    Ok(members)
}

/// Every module of a crate: each `.rs` file under `src/` but the crate
/// roots, named by its file (or, for `mod.rs`, its directory), and each
/// test binary directory under `tests/`.
fn modules(crate_dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut dirs = vec![crate_dir.join("src")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = match path.file_name().and_then(|n| n.to_str()) {
                Some("lib.rs" | "main.rs") | None => continue,
                Some("mod.rs") => path.parent().and_then(|p| p.file_name()),
                Some(_) => path.file_stem(),
            };
            if path.extension().is_some_and(|e| e == "rs") {
                found.extend(name.and_then(|n| n.to_str()).map(str::to_owned));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(crate_dir.join("tests")) {
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                found.extend(path.file_name().and_then(|n| n.to_str()).map(str::to_owned));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Whether `row` names `module` inside backticks: `name`, or a path with
/// it as a component (`service/friends`, `src/servers.rs`, `tests/e2e/`).
fn names(row: &str, module: &str) -> bool {
    row.split('`').skip(1).step_by(2).any(|quoted| {
        quoted
            .split(['/', '.', ' ', ',', ':', '(', ')'])
            .any(|part| part == module)
    })
}

#[test]
fn the_codemap_names_every_crate_and_module() -> Result<()> {
    let doc = architecture()?;
    let mut missing = Vec::new();
    for member in members()? {
        let prefix = format!("| `{member}/` |");
        let Some(row) = doc.lines().find(|line| line.starts_with(&prefix)) else {
            missing.push(format!("crate {member}/ has no codemap row"));
            continue;
        };
        for module in modules(&root().join(&member))? {
            if !names(row, &module) {
                missing.push(format!("{member}/: module `{module}` is not in its row"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md codemap:\n{}",
        missing.join("\n")
    );
    Ok(())
}

/// The section `### \`<member>/\`` under "Entry points and invariants".
fn section<'a>(doc: &'a str, member: &str) -> Option<&'a str> {
    let heading = format!("### `{member}/`");
    let start = doc.find(&heading)? + heading.len();
    let rest = &doc[start..];
    let end = rest.find("\n#").unwrap_or(rest.len());
    Some(&rest[..end])
}

#[test]
fn every_crate_has_entry_points_that_exist_and_an_invariant() -> Result<()> {
    let doc = architecture()?;
    let mut wrong = Vec::new();
    for member in members()? {
        let Some(text) = section(&doc, &member) else {
            wrong.push(format!("{member}/ has no entry-point section"));
            continue;
        };
        if !text.contains("Architecture invariant:") {
            wrong.push(format!("{member}/ states no architecture invariant"));
        }
        // Entry points are written `path/to/file.rs::function`.
        let entries: Vec<&str> = text
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|quoted| quoted.contains(".rs::"))
            .collect();
        if entries.is_empty() {
            wrong.push(format!("{member}/ names no entry point"));
        }
        for entry in entries {
            let (file, function) = entry.split_once(".rs::").unwrap_or_default();
            let source =
                std::fs::read_to_string(root().join(format!("{file}.rs"))).unwrap_or_default();
            if !source.contains(&format!("fn {function}("))
                && !source.contains(&format!("fn {function}<"))
            {
                wrong.push(format!("{member}/: entry point {entry} does not exist"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/architecture.md entry points:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

#[test]
fn the_module_walk_sees_what_is_there() -> Result<()> {
    // The checks above can fail: this crate's own modules are found.
    let found = modules(&root().join("tests"))?;
    for expected in ["chaos", "checker", "servers", "e2e", "tree"] {
        assert!(
            found.iter().any(|m| m == expected),
            "{expected} not in {found:?}"
        );
    }
    assert!(names("| `src/chaos/` (`checker`) |", "checker"));
    assert!(!names("| `src/chaos/` (`checker`) |", "check"));
    Ok(())
}
