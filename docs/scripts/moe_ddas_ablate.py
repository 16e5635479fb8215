"""DDAS ablations on a finished moe-adapters run's final model (experts and routers as trained): where the final
model's test images go and its Last accuracy, with (a) the run's autoencoders, (b) the task autoencoders retrained
at a constant lr (ae_decay_epochs 0), (c) = (a) without the reference slot, (d) = (b) without it, (e) oracle task id."""
import torch

from finished_run import finished_runner

run = finished_runner(copy=True)
m, model, tasks = run.method, run.model, run.scenario.tasks
data = []
for t in tasks:
    xs, ys = zip(*run.data.eval_batches(t.test))
    x, y = torch.cat(xs), torch.cat(ys)
    data.append((t, x, run.data.classes.columns(y, torch.as_tensor(t.class_ids)).cpu()))


def report(label):
    accs, shares = [], []
    with torch.no_grad():
        for t, x, target in data:
            ids = torch.as_tensor(t.class_ids)
            route = m.select(m.zero_shot_features(x))
            accs.append(100 * float((m.logits(x, ids).argmax(1).cpu() == target).float().mean()))
            shares.append((100 * float((route < 0).float().mean()), 100 * float((route == t.index).float().mean())))
    print(f"{label:42s} Last {sum(accs) / len(accs):.2f}  per set {[round(a, 2) for a in accs]}  "
          f"(zero-shot %, own-router %) {[(round(a, 1), round(b, 1)) for a, b in shares]}")


report("(a) as run")
m.bank.trained[0] = False
report("(c) no reference slot")
m.bank.trained[0] = True
m.cfg.ae_decay_epochs = 0
for t in tasks:
    m._train_task_autoencoder(t)
report("(b) task AEs at constant lr")
m.bank.trained[0] = False
report("(d) constant lr, no reference slot")
with torch.no_grad():
    accs = []
    for t, x, target in data:
        for mm in m.mixtures:
            mm.set_route(t.index)
        accs.append(100 * float((model(x, torch.as_tensor(t.class_ids)).argmax(1).cpu() == target).float().mean()))
print(f"{'(e) oracle task id':42s} Last {sum(accs) / len(accs):.2f}  per set {[round(a, 2) for a in accs]}")
