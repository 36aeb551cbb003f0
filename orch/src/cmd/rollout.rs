//! `orch rollout status|history|undo|pause|resume|restart` and `orch scale`.

use std::io::IsTerminal;
use std::time::Duration;

use futures::StreamExt;
use orch_core::kinds::{Deployment, deployment_condition, find_condition};
use orch_core::{Api, Object, ObjectKey, Selection, WatchEvent, WatchRequest};

use super::BoxError;
use super::client::{Client, ConnArgs, split_targets, table};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum RolloutCommand {
    /// Follows a deployment's rollout to its end: a live progress bar on a terminal, a line
    /// per change in a pipe. Exits 0 when it completes, 1 when it fails (its progress deadline
    /// passed, or the deployment rolled itself back).
    #[command(after_help = "Examples:
  orch rollout status deployment/web
  orch rollout status deploy web --timeout 5m     # for CI: fails after 5 minutes")]
    Status {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
        /// Give up (exit 1) after this long: `90s`, `5m`, `1h` (default: wait for the end).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Lists a deployment's revisions, the current one marked.
    #[command(after_help = "Example:\n  orch rollout history deployment/web")]
    History {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
    },
    /// Makes an earlier revision current again (by default the one before the current).
    #[command(
        after_help = "Examples:\n  orch rollout undo deployment/web\n  orch rollout undo deployment/web --to-revision 2"
    )]
    Undo {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
        /// The revision to go back to (see `rollout history`).
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// Stops template changes from rolling out (scaling still applies).
    #[command(after_help = "Example:\n  orch rollout pause deployment/web")]
    Pause {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
    },
    /// Lets a paused deployment roll out again.
    #[command(after_help = "Example:\n  orch rollout resume deployment/web")]
    Resume {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
    },
    /// Replaces every workload of a deployment with a fresh copy, as a rollout.
    #[command(after_help = "Example:\n  orch rollout restart deployment/web")]
    Restart {
        /// `deployment/web` or `deployment web`.
        #[arg(required = true)]
        target: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  orch scale deployment/web --replicas 5
  orch scale rs web-6d5f8c --replicas 0")]
pub(crate) struct ScaleArgs {
    /// `deployment/web` or `deployment web` (any kind with `spec.replicas`).
    #[arg(required = true)]
    target: Vec<String>,
    /// The number of replicas wanted.
    #[arg(long)]
    replicas: u32,
}

/// `90s`, `5m`, `2h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration such as 90s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?} is not a duration such as 90s, 5m or 1h")),
    };
    Ok(Duration::from_secs(secs))
}

/// The deployment a target names.
fn deployment_name(client: &Client, target: &[String]) -> Result<String, BoxError> {
    let (word, names) = split_targets(target)?;
    let kind = client.kind(&word)?;
    if kind.kind != "Deployment" {
        return Err(format!("rollouts are of deployments, not of {}", kind.name).into());
    }
    match names.as_slice() {
        [n] => Ok(n.clone()),
        _ => Err("name one deployment: `deployment/web`".into()),
    }
}

/// Where a rollout stands.
enum Progress {
    /// Still going: a sentence, and (done, total) for a bar.
    Going(String, u64, u64),
    Done(String),
    Failed(String),
}

fn progress(d: &Object<Deployment>, rolled_back_before: Option<orch_core::Timestamp>) -> Progress {
    let name = &d.metadata.name;
    let st = &d.status;
    let want = u64::from(d.spec.replicas);
    if let Some(c) = find_condition(&st.conditions, deployment_condition::ROLLED_BACK)
        && c.status == orch_core::kinds::ConditionStatus::True
        && c.last_transition_time != rolled_back_before
    {
        return Progress::Failed(format!("deployment {name:?} rolled itself back ({}): {}", c.reason, c.message));
    }
    if let Some(c) = find_condition(&st.conditions, deployment_condition::PROGRESSING)
        && c.reason == "ProgressDeadlineExceeded"
    {
        return Progress::Failed(format!("deployment {name:?} exceeded its progress deadline: {}", c.message));
    }
    if d.spec.paused {
        return Progress::Failed(format!(
            "deployment {name:?} is paused: resume it to roll out (orch rollout resume deployment/{name})"
        ));
    }
    if st.observed_generation < d.metadata.generation {
        return Progress::Going(format!("Waiting for deployment {name:?} spec update to be observed..."), 0, want);
    }
    let (updated, available, total) =
        (u64::from(st.updated_replicas), u64::from(st.available_replicas), u64::from(st.replicas));
    if updated < want {
        return Progress::Going(
            format!(
                "Waiting for deployment {name:?} rollout to finish: {updated} out of {want} new replicas have been updated..."
            ),
            updated.min(available),
            want,
        );
    }
    if total > updated {
        return Progress::Going(
            format!(
                "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
                total - updated
            ),
            updated,
            want,
        );
    }
    if available < updated {
        return Progress::Going(
            format!(
                "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
            ),
            available,
            want,
        );
    }
    Progress::Done(format!("deployment {name:?} successfully rolled out"))
}

async fn status(client: &Client, name: &str, timeout: Option<Duration>) -> Result<(), BoxError> {
    let api: Api<Deployment> = Api::namespaced(client.store.clone(), &client.namespace);
    let first = api.get(name).await?;
    let before = find_condition(&first.status.conditions, deployment_condition::ROLLED_BACK)
        .and_then(|c| c.last_transition_time);
    let key = ObjectKey::new("Deployment", &client.namespace, name);
    let revision = first.metadata.resource_version;
    let sel = Selection::kind("Deployment").in_namespace(client.namespace.clone());
    let mut stream = client.store.watch(&WatchRequest::from(sel, revision + 1)).await?;
    let terminal = std::io::stderr().is_terminal();
    let bar = terminal.then(|| {
        let b = indicatif::ProgressBar::new(u64::from(first.spec.replicas));
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last_line = String::new();
    let mut current = first;
    loop {
        match progress(&current, before) {
            Progress::Done(msg) => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                outln!("{msg}");
                return Ok(());
            }
            Progress::Failed(msg) => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(msg.into());
            }
            Progress::Going(msg, done, total) => {
                if let Some(b) = &bar {
                    b.set_length(total);
                    b.set_position(done);
                    b.set_message(msg);
                } else if msg != last_line {
                    outln!("{msg}");
                    last_line = msg;
                }
            }
        }
        let next = async {
            loop {
                match stream.next().await {
                    Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) if o.key() == key => {
                        return Ok(Some(Object::<Deployment>::from_dynamic(&o)?));
                    }
                    Some(Ok(WatchEvent::Deleted(o))) if o.key() == key => return Ok(None),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(BoxError::from(e)),
                    None => return Err("the watch ended".into()),
                }
            }
        };
        let got = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(r) => r?,
                Err(_) => {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    return Err(format!("deployment {name:?}: the rollout did not finish within the timeout").into());
                }
            },
            None => next.await?,
        };
        match got {
            Some(d) => current = d,
            None => return Err(format!("deployment {name:?} was deleted").into()),
        }
    }
}

pub(crate) async fn run(conn: &ConnArgs, cmd: RolloutCommand) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let ns = client.namespace.clone();
    let api: Api<Deployment> = Api::namespaced(client.store.clone(), &ns);
    match cmd {
        RolloutCommand::Status { target, timeout } => {
            let name = deployment_name(&client, &target)?;
            status(&client, &name, timeout).await
        }
        RolloutCommand::History { target } => {
            let name = deployment_name(&client, &target)?;
            let d = api.get(&name).await?;
            let current = orch_controllers::deployment::revision_name(&name, &d.spec.template);
            let revs = orch_controllers::deployment::history(client.store.clone(), &ns, &name).await?;
            let rows: Vec<Vec<String>> = revs
                .iter()
                .map(|(n, rs)| {
                    let cmds = rs
                        .spec
                        .template
                        .spec
                        .containers
                        .iter()
                        .map(|c| c.image.clone().unwrap_or_else(|| c.command.join(" ")))
                        .collect::<Vec<_>>()
                        .join(",");
                    let mark = if rs.metadata.name == current { "*" } else { "" };
                    let failed = rs
                        .metadata
                        .annotations
                        .get(orch_controllers::deployment::FAILED_ANNOTATION)
                        .map(|r| format!("failed: {r}"))
                        .unwrap_or_default();
                    vec![format!("{n}{mark}"), rs.metadata.name.clone(), rs.spec.replicas.to_string(), cmds, failed]
                })
                .collect();
            outln!("deployment/{name}");
            out!("{}", table(&["REVISION", "NAME", "REPLICAS", "CONTAINERS", "NOTE"], &rows, true));
            Ok(())
        }
        RolloutCommand::Undo { target, to_revision } => {
            let name = deployment_name(&client, &target)?;
            let before = api.get(&name).await?;
            // The revision the rollback goes to, as numbered before it (the controller numbers
            // it anew once it is current again).
            let current = orch_controllers::deployment::revision_name(&name, &before.spec.template);
            let history = orch_controllers::deployment::history(client.store.clone(), &ns, &name).await?;
            let current_number = history.iter().find(|(_, rs)| rs.metadata.name == current).map(|(n, _)| *n);
            let target_number = to_revision.or_else(|| {
                history
                    .iter()
                    .rev()
                    .find(|(n, rs)| rs.metadata.name != current && current_number.is_none_or(|c| *n < c))
                    .map(|(n, _)| *n)
            });
            let d = orch_controllers::deployment::rollback(client.store.clone(), &ns, &name, to_revision).await?;
            if d.metadata.generation == before.metadata.generation {
                outln!("deployment/{name} unchanged: that revision is already current");
            } else {
                match target_number {
                    Some(n) => outln!("deployment/{name} rolled back to revision {n}"),
                    None => outln!("deployment/{name} rolled back"),
                }
            }
            Ok(())
        }
        RolloutCommand::Pause { target } => set_paused(&client, &api, &target, true).await,
        RolloutCommand::Resume { target } => set_paused(&client, &api, &target, false).await,
        RolloutCommand::Restart { target } => {
            let name = deployment_name(&client, &target)?;
            let now = orch_core::Clock::now(&orch_core::SystemClock);
            orch_controllers::deployment::restart(client.store.clone(), &ns, &name, now).await?;
            outln!("deployment/{name} restarted");
            Ok(())
        }
    }
}

async fn set_paused(client: &Client, api: &Api<Deployment>, target: &[String], paused: bool) -> Result<(), BoxError> {
    let name = deployment_name(client, target)?;
    let d = api.get(&name).await?;
    let word = if paused { "paused" } else { "resumed" };
    if d.spec.paused == paused {
        outln!("deployment/{name} already {word}");
        return Ok(());
    }
    api.retry_on_conflict(&name, |d| {
        d.spec.paused = paused;
        Ok(())
    })
    .await?;
    outln!("deployment/{name} {word}");
    Ok(())
}

pub(crate) async fn scale(conn: &ConnArgs, args: ScaleArgs) -> Result<(), BoxError> {
    let client = Client::connect(conn).await?;
    let (word, names) = split_targets(&args.target)?;
    let kind = client.kind(&word)?.clone();
    for name in names {
        let key = ObjectKey::new(&kind.kind, client.ns_for(&kind.kind), &name);
        for attempt in 0.. {
            let obj = client.store.get(&key).await?;
            let mut spec = obj.spec.to_value();
            if spec.get("replicas").is_none() {
                return Err(format!("{} {name} has no spec.replicas: it cannot be scaled", kind.kind).into());
            }
            spec["replicas"] = args.replicas.into();
            let mut next = (*obj).clone();
            next.spec = orch_core::RawJson::from_value(&spec);
            match client.store.update(next, &Default::default()).await {
                Ok(_) => break,
                Err(e) if e.is_conflict() && attempt < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        outln!("{}/{name} scaled to {}", kind.kind.to_ascii_lowercase(), args.replicas);
    }
    Ok(())
}
