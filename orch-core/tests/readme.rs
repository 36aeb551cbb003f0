//! The README's "Using it" snippet, kept compiling and passing.

use std::sync::Arc;

use orch_core::{Api, ListParams, Object, ObjectMeta, Store, kinds::Workload};
use orch_store::MemoryStore;

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let workloads: Api<Workload> = Api::namespaced(store, "default");
    let mut w = Workload::command("main", &["/bin/sleep", "60"]);
    w.containers[0].resources.requests.insert("cpu".into(), "500m".parse()?);
    let meta = ObjectMeta::named("web-0").with_label("app", "web");
    workloads.create(&Object::new(meta, w)).await?;
    let web = workloads.list(&ListParams { labels: "app=web".parse()?, ..Default::default() }).await?;
    assert_eq!(web.items.len(), 1);
    Ok(())
}

#[tokio::test]
async fn readme_snippet_runs() {
    demo().await.unwrap();
}
