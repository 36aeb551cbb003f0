//! The shortest real answer to "how do I write an operator with orch?".
//!
//! A user-defined kind, `Echo { message, replicas }`, gets a controller that keeps `replicas`
//! owned `EchoReplica` children in existence, reports how many are ready in its status, and
//! cleans them up through a finalizer when the `Echo` is deleted.
//!
//! `cargo run -p orch-examples --example echo-operator`

use std::sync::Arc;
use std::time::Duration;

use orch_core::controller::finalizer::{FinalizerEvent, finalizer};
use orch_core::{
    Action, Api, Context, Controller, ControllerBuilder, DeleteOptions, Error, ListParams, Manager, Object, ObjectMeta,
    Resource, Scope, Store, Validator,
};
use orch_store::MemoryStore;
use serde::{Deserialize, Serialize};

/// Desired state: print `message` from `replicas` replicas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Echo {
    message: String,
    replicas: u32,
}

/// Observed state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EchoStatus {
    ready: u32,
}

impl Resource for Echo {
    const KIND: &'static str = "Echo";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = EchoStatus;

    fn validate(&self, v: &mut Validator) {
        v.check(!self.message.is_empty(), || "spec.message".into(), "must not be empty");
        v.check(self.replicas <= 50, || "spec.replicas".into(), "must be <= 50");
    }
}

/// One replica, owned by its Echo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EchoReplica {
    message: String,
}

impl Resource for EchoReplica {
    const KIND: &'static str = "EchoReplica";
    const SCOPE: Scope = Scope::Namespaced;
    type Status = ();
}

struct EchoController;

#[async_trait::async_trait]
impl Controller for EchoController {
    type Kind = Echo;
    type Error = Error;

    async fn reconcile(&self, echo: Arc<Object<Echo>>, ctx: &Context) -> Result<Action, Error> {
        let ns = echo.metadata.namespace.clone();
        let echoes: Api<Echo> = ctx.api(&ns);
        let replicas: Api<EchoReplica> = ctx.api(&ns);
        let children = ctx.cache::<EchoReplica>().expect("the controller owns EchoReplica, so it is cached");
        let status_api = echoes.clone();
        finalizer(&echoes, "example.orch.dev/echo-cleanup", echo, |event| async move {
            match event {
                FinalizerEvent::Apply(echo) => {
                    let mine = children.owned_by(&echo.metadata.uid);
                    let wanted: Vec<String> =
                        (0..echo.spec.replicas).map(|i| format!("{}-{i}", echo.metadata.name)).collect();
                    for name in wanted.iter().filter(|n| !mine.iter().any(|c| &c.metadata.name == *n)) {
                        let mut meta = ObjectMeta::named(name.clone());
                        meta.owner_references = vec![echo.controller_ref()];
                        match replicas
                            .create(&Object::new(meta, EchoReplica { message: echo.spec.message.clone() }))
                            .await
                        {
                            Ok(_) => println!("  [controller] created {name}"),
                            Err(Error::AlreadyExists(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    for extra in mine.iter().filter(|c| !wanted.contains(&c.metadata.name)) {
                        if replicas.delete(&extra.metadata.name, &DeleteOptions::default()).await.is_ok() {
                            println!("  [controller] deleted {}", extra.metadata.name);
                        }
                    }
                    let ready = children.owned_by(&echo.metadata.uid).len() as u32;
                    if echo.status.ready != ready {
                        let mut with_status = (*echo).clone();
                        with_status.status.ready = ready;
                        status_api.replace_status(&with_status).await?;
                    }
                    Ok(Action::Done)
                }
                FinalizerEvent::Cleanup(echo) => {
                    for child in children.owned_by(&echo.metadata.uid) {
                        let _ = replicas.delete(&child.metadata.name, &DeleteOptions::default()).await;
                        println!("  [controller] cleanup: deleted {}", child.metadata.name);
                    }
                    Ok(Action::Done)
                }
            }
        })
        .await
        .map_err(|e| Error::Unavailable { message: e.to_string(), source: None })
    }
}

async fn show(echoes: &Api<Echo>, replicas: &Api<EchoReplica>) -> orch_core::Result<()> {
    for e in echoes.list(&ListParams::default()).await?.items {
        println!("  echo {}: replicas={} ready={}", e.metadata.name, e.spec.replicas, e.status.ready);
    }
    let names: Vec<String> =
        replicas.list(&ListParams::default()).await?.items.into_iter().map(|r| r.metadata.name).collect();
    println!("  replicas: {names:?}");
    Ok(())
}

#[tokio::main]
async fn main() -> orch_core::Result<()> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let echoes: Api<Echo> = Api::namespaced(store.clone(), "default");
    let replicas: Api<EchoReplica> = Api::namespaced(store.clone(), "default");

    let mut manager = Manager::new(store.clone());
    manager.add(ControllerBuilder::new("echo", EchoController).owns::<EchoReplica>());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut ready = manager.readiness();
    let running = tokio::spawn(manager.run(async move {
        let _ = stopped.await;
    }));
    let _ = ready.wait_for(|r| *r).await;
    let settle = || tokio::time::sleep(Duration::from_millis(300));

    println!("create echo 'hello' with 3 replicas");
    echoes.create(&Object::new(ObjectMeta::named("hello"), Echo { message: "hi".into(), replicas: 3 })).await?;
    settle().await;
    show(&echoes, &replicas).await?;

    println!("invalid input is refused:");
    if let Err(e) =
        echoes.create(&Object::new(ObjectMeta::named("bad"), Echo { message: String::new(), replicas: 99 })).await
    {
        println!("  {e}");
    }

    println!("delete replica hello-1 behind the controller's back");
    replicas.delete("hello-1", &DeleteOptions::default()).await?;
    settle().await;
    show(&echoes, &replicas).await?;

    println!("scale to 1");
    echoes.patch("hello", &serde_json::json!({"spec": {"replicas": 1}})).await?;
    settle().await;
    show(&echoes, &replicas).await?;

    println!("delete echo 'hello': the finalizer cleans up first");
    echoes.delete("hello", &DeleteOptions::default()).await?;
    settle().await;
    show(&echoes, &replicas).await?;

    let _ = stop.send(());
    running.await.expect("manager task")?;
    println!("stopped cleanly");
    Ok(())
}
