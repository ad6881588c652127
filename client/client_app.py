"""The hospital's Flower ClientApp: decrypt, check the budget, train with DP, encrypt.

Order of a train round (each step can refuse: a RefusalCode and a reason go back):

1. parse and validate the instruction (job config, round, key epoch); resolve
   the job's task in this hospital's own environment and check consent: the
   coordinator's task fingerprint must equal this hospital's, and the
   hospital's site policy must allow the task, its version, ε, δ and the
   number of records (nothing is trained otherwise);
2. decrypt the global model with the hospital's secret HE context — a
   fingerprint or epoch mismatch is refused before any arithmetic;
3. ask the local ledger whether this round's DP-SGD steps fit the budget;
4. train with Opacus, continuing the job's accountant state;
5. record the new privacy spend *before* anything leaves the hospital;
6. weight the model by the sample count, encrypt, reply with metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import zlib
from dataclasses import asdict

import numpy as np
from cryptography.hazmat.primitives.serialization import Encoding
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedvault.client import masking
from fedvault.client.archive import ModelArchive
from fedvault.client.keys import custodian_ceremony, install_sealed_key
from fedvault.client.ledger import LocalLedger
from fedvault.client.metrics import count_refusal, timed
from fedvault.client.sent import SentUpdates
from fedvault.client.site import HospitalIdentity, HospitalSite, SiteProvider
from fedvault.config import JobConfig, SecureAggregation
from fedvault.durable import atomic_write
from fedvault.errors import (
    FedvaultError,
    KeyMismatchError,
    MalformedUpdateError,
    TaskMismatchError,
)
from fedvault.fingerprint import TaskFingerprint
from fedvault.messages import (
    SUMMARY_KEY,
    UNMASK_KEY,
    CeremonyReply,
    CeremonyRequest,
    EvalReply,
    HelloReply,
    HelloRequest,
    InstallKeyReply,
    ModelPayload,
    ReplyStatus,
    RoundInstruction,
    SealKeyReply,
    SealKeyRequest,
    TrainReply,
    UnmaskAnswer,
    UnmaskQuery,
    ceremony_request,
    refusal_code,
    refusal_reason,
)
from fedvault.privacy.dp import DpPlan, PrivacyConfig, plan_dp
from fedvault.privacy.he import decrypt_average, encrypt_update, parse_envelope

__all__ = ["app", "make_client_app"]

log = logging.getLogger("fedvault.client")


def _global_model(site: HospitalSite, instr: RoundInstruction) -> dict:
    if instr.job.secure_aggregation is SecureAggregation.HE:
        if instr.model.envelope is None:
            raise KeyMismatchError(
                "the coordinator sent a plaintext model for an encrypted job; refusing"
            )
        site.keys.get(instr.key_epoch)  # this round's updates need the current key
        fingerprint = parse_envelope(instr.model.envelope).context_fingerprint
        with timed("decryption"):
            return decrypt_average(site.keys.find(fingerprint), instr.model.envelope)
    if instr.model.arrays is None:
        raise KeyMismatchError("the coordinator sent ciphertext for a plaintext job")
    return dict(instr.model.arrays)


def _train_seed(job: JobConfig, hospital: str, server_round: int) -> int:
    return (job.seed * 1_000_003 + server_round * 7919 + zlib.crc32(hospital.encode())) % 2**31


@functools.lru_cache(maxsize=1024)
def _derive_plan(
    privacy: PrivacyConfig, n: int, batch_size: int, local_epochs: int, rounds: int
) -> DpPlan:
    """plan_dp, memoised per process.

    A simulation worker plays many hospitals of similar size, and the noise
    search depends on nothing else (~1 s each).
    """
    return plan_dp(
        privacy, num_samples=n, batch_size=batch_size, local_epochs=local_epochs, rounds=rounds
    )


def _plan(site: HospitalSite, job: JobConfig, n: int, batch_size: int) -> DpPlan:
    """The job's DP plan, cached in the hospital's state directory.

    Deployed ClientApps run one process per message, and deriving the noise
    multiplier with the PRV accountant takes seconds: compute it once per job.
    """
    path = site.state_dir / "dp-plans.json"
    p = job.privacy
    key = json.dumps(
        [p.epsilon, p.delta, p.accountant, n, batch_size, job.training.local_epochs, job.rounds]
    )
    cache: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        return DpPlan(**cache[key])
    plan = _derive_plan(job.privacy, n, batch_size, job.training.local_epochs, job.rounds)
    cache[key] = asdict(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(cache))
    return plan


def _check_task(site: HospitalSite, instr: RoundInstruction) -> None:
    """The coordinator's task must be this hospital's, byte for byte and tensor for tensor."""
    if not instr.task_fingerprint:
        raise TaskMismatchError(
            "the coordinator sent no task fingerprint; refusing to train a task whose code "
            "cannot be compared with this hospital's (upgrade the coordinator's fedvault)"
        )
    try:
        theirs = TaskFingerprint.from_json(instr.task_fingerprint)
    except MalformedUpdateError as exc:
        raise TaskMismatchError(f"the coordinator's task fingerprint is malformed: {exc}") from exc
    theirs.check_matches(site.fingerprint)


def _consent(site: HospitalSite, instr: RoundInstruction, ledger: LocalLedger) -> None:
    """Refuse, before any training, a task or job this hospital has not agreed to."""
    _check_task(site, instr)
    if site.policy is None:
        return
    job = instr.job
    site.policy.check(
        task=site.task.name,
        version=site.fingerprint.version,
        fingerprint=site.fingerprint.digest,
        epsilon=job.privacy.epsilon,
        delta=job.privacy.delta,
        records=len(site.train_data),  # type: ignore[arg-type]
        spent_elsewhere=ledger.spent_elsewhere(job.job, delta=job.privacy.delta),
    )


def _archive(site: HospitalSite, instr: RoundInstruction, server_round: int) -> None:
    """Keep the global model version received (ciphertext stays ciphertext) for export."""
    archive = ModelArchive(site.state_dir)
    archive.put_model(
        instr.job.job,
        server_round,
        instr.model,
        job_config=instr.job.to_json(),
        task_fingerprint=instr.task_fingerprint,
    )
    if instr.summary:
        archive.put_summary(instr.job.job, json.loads(instr.summary))


def _evaluation(site: HospitalSite, model: object) -> tuple[float, float, int, str]:
    """(accuracy, loss, records, metrics JSON) of ``model`` on the held-out data."""
    from fedvault.client.training import evaluate  # torch: only where a model runs

    result = evaluate(model, site.test_data, task=site.task, device=site.device)  # type: ignore[arg-type]
    accuracy = float(result.metrics.get("accuracy", 0.0))
    return accuracy, result.loss, result.samples, result.to_json()


def _train(site: HospitalSite, instr: RoundInstruction) -> TrainReply:
    from fedvault.client.training import get_weights, set_weights, train_private

    job = instr.job
    n = len(site.train_data)  # type: ignore[arg-type]
    batch_size = min(job.training.batch_size, n)
    ledger = LocalLedger(site.ledger_path, hospital=site.name)
    try:
        _consent(site, instr, ledger)
        plan = _plan(site, job, n, batch_size)
        ledger.check_round(
            job=job.job,
            server_round=instr.server_round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
            budget=site.epsilon_budget or job.privacy.epsilon,
            delta=job.privacy.delta,
        )
        model = site.build_model()
        shared = site.task.shared_names(model)
        set_weights(model, _global_model(site, instr), shared)
        _archive(site, instr, instr.server_round - 1)
        eval_accuracy, eval_loss, eval_samples, evaluation = 0.0, 0.0, 0, ""
        if instr.server_round > 1:  # the previous round's aggregate, on held-out data
            eval_accuracy, eval_loss, eval_samples, evaluation = _evaluation(site, model)
        with timed("training"):
            result = train_private(
                model,
                site.train_data,
                task=site.task,
                training=job.training,
                max_grad_norm=job.privacy.max_grad_norm,
                batch_size=batch_size,
                plan=plan,
                state=ledger.state(job.job),
                device=site.device,
                seed=_train_seed(job, site.name, instr.server_round),
                max_physical_batch_size=site.max_physical_batch,
                secure_rng=site.secure_rng,
            )
        # The spend is on the books before the update can leave the hospital.
        entry = ledger.record_round(
            job=job.job,
            server_round=instr.server_round,
            state=result.state,
            delta=job.privacy.delta,
        )
    finally:
        ledger.close()
    update, masked_shares = _release(site, instr, get_weights(model, shared), n)
    return TrainReply(
        hospital=site.name,
        status=ReplyStatus.OK,
        update=update,
        samples=n,
        train_loss=result.loss,
        epsilon=entry.epsilon,
        delta=job.privacy.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=result.state.steps,
        round_steps=result.round_steps,
        accountant=result.state.accountant,
        accountant_state=result.state.to_json(),
        eval_accuracy=eval_accuracy,
        eval_loss=eval_loss,
        eval_samples=eval_samples,
        evaluation=evaluation,
        masked_shares=masked_shares,
    )


def _masks(job: JobConfig) -> bool:
    """Whether this hospital masks its updates for ``job`` (docs/secagg.md).

    Every ``he`` job with ``masking`` (the default) of at least three hospitals:
    with two, each learns the other's update from the aggregate anyway.
    """
    return job.masked and job.hospitals >= masking.PARAMS.min_participants


def _seal_keys(site: HospitalSite | HospitalIdentity) -> masking.SealKeys:
    """The hospital's X25519 key and the enrolled peers' (the kit's; simulated: its own)."""
    if site.kit is not None:
        return site.kit.seal_private_key(), site.kit.seal_public_keys()
    return masking.simulated_seal_keys(site.state_dir)


def _release(
    site: HospitalSite, instr: RoundInstruction, weights: dict[str, np.ndarray], n: int
) -> tuple[ModelPayload, str]:
    """The update as it leaves the hospital, and its masked shares (masked rounds)."""
    job = instr.job
    if _masks(job):
        with timed("encryption"):
            envelope, shares = masking.masked_update(
                site.keys, _seal_keys(site), site.name, instr, weights, n, state_dir=site.state_dir
            )
        return ModelPayload(envelope=envelope), shares
    if job.secure_aggregation is SecureAggregation.HE:
        with timed("encryption"):
            envelope = encrypt_update(
                site.keys.get(instr.key_epoch),
                weights,
                weight=float(n),
                key_epoch=instr.key_epoch,
                job=job.job,
                server_round=instr.server_round,
            )
        return ModelPayload(envelope=envelope), ""
    return ModelPayload(arrays=weights), ""


def _replay(site: HospitalSite, instr: RoundInstruction, reply: TrainReply) -> TrainReply:
    """A reply already released, re-masked if this is another attempt of a masked round."""
    log.info("%s: round %d was already answered; replaying it", site.name, instr.server_round)
    if not _masks(instr.job):
        return reply
    fresh = masking.remask(
        site.keys,
        _seal_keys(site),
        site.name,
        instr,
        reply.masked_shares,
        reply.samples,
        state_dir=site.state_dir,
    )
    if fresh is None:
        return reply
    envelope, shares = fresh
    return dataclasses.replace(reply, update=ModelPayload(envelope=envelope), masked_shares=shares)


def _unmask(who: HospitalIdentity, msg: Message) -> Message:
    """Answer a masked round's unmask query (one context per job and round)."""
    try:
        query = UnmaskQuery.from_message(msg)
        answer = masking.answer_unmask(_seal_keys(who), who.name, query, state_dir=who.state_dir)
    except (FedvaultError, KeyError, TypeError, ValueError) as exc:
        log.warning("%s refused an unmask query: %s", who.name, exc)
        answer = UnmaskAnswer(hospital=who.name, status=ReplyStatus.REFUSED, reason=str(exc))
    return Message(answer.to_content(), reply_to=msg)


def _ceremony(who: HospitalIdentity, request: CeremonyRequest) -> CeremonyReply:
    """Answer one key-ceremony request (see :mod:`fedvault.client.keys`)."""
    if isinstance(request, HelloRequest):
        return HelloReply(
            hospital=who.name,
            epochs=tuple(int(e) for e in who.keys.epochs()),
            custodian=who.kit is not None and who.kit.is_custodian,
        )
    if who.kit is None:
        raise KeyMismatchError(f"{who.name} has no kit: key ceremonies need a provisioned hospital")
    if isinstance(request, SealKeyRequest):
        public, envelopes = custodian_ceremony(
            who.kit, who.keys, epoch=request.epoch, recipients=list(request.recipients)
        )
        return SealKeyReply(
            hospital=who.name,
            public_context=public,
            custodian_cert=who.kit.certificate().public_bytes(Encoding.PEM),
            envelopes=envelopes,
        )
    fingerprint = install_sealed_key(
        who.kit,
        who.keys,
        envelope=request.envelope,
        custodian_cert_pem=request.custodian_cert,
        epoch=request.epoch,
        public_fingerprint=request.fingerprint,
    )
    return InstallKeyReply(hospital=who.name, fingerprint=fingerprint)


def _keep_summary(who: HospitalIdentity, msg: Message) -> Message:
    """The job ended: keep its final report beside the model versions, for export."""
    record = msg.content.config_records[SUMMARY_KEY]
    reply = ConfigRecord({"hospital": who.name, "status": "ok", "reason": ""})
    try:
        job = str(record["job"])
        summary = json.loads(str(record["summary"]))
        if not isinstance(summary, dict):
            raise ValueError("the summary is not a JSON object")
        ModelArchive(who.state_dir).put_summary(job, summary)
        masking.purge_committed(who.state_dir, job)
    except (FedvaultError, KeyError, ValueError) as exc:
        log.warning("%s: job summary not kept: %s", who.name, exc)
        reply["status"], reply["reason"] = "refused", f"{type(exc).__name__}: {exc}"
    return Message(RecordDict({SUMMARY_KEY: reply}), reply_to=msg)


def _evaluate(site: HospitalSite, instr: RoundInstruction) -> EvalReply:
    """Evaluate the global model on this hospital's held-out data (with its consent)."""
    ledger = LocalLedger(site.ledger_path, hospital=site.name)
    try:
        _consent(site, instr, ledger)
    finally:
        ledger.close()
    from fedvault.client.training import set_weights

    model = site.build_model()
    set_weights(model, _global_model(site, instr), site.task.shared_names(model))
    _archive(site, instr, instr.server_round)
    masking.purge_committed(site.state_dir, instr.job.job, through_round=instr.server_round)
    accuracy, loss, seen, evaluation = _evaluation(site, model)
    return EvalReply(
        hospital=site.name,
        status=ReplyStatus.OK,
        accuracy=accuracy,
        loss=loss,
        samples=seen,
        evaluation=evaluation,
    )


def _query(who: HospitalIdentity, msg: Message) -> Message:
    """Answer a query: the job's final summary, or a key-ceremony request."""
    if SUMMARY_KEY in msg.content.config_records:
        return _keep_summary(who, msg)
    if UNMASK_KEY in msg.content.config_records:
        return _unmask(who, msg)
    try:
        reply = _ceremony(who, ceremony_request(msg))
    except (FedvaultError, KeyError, TypeError, ValueError) as exc:
        log.warning("%s refused a key-ceremony request: %s", who.name, exc)
        reply = CeremonyReply(
            hospital=who.name,
            status=ReplyStatus.REFUSED,
            reason=refusal_reason(exc),
            code=refusal_code(exc),
        )
    return Message(reply.to_content(), reply_to=msg)


def make_client_app(sites: SiteProvider) -> ClientApp:
    """A ClientApp serving the hospitals that ``sites`` resolves."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        instr = RoundInstruction.from_message(msg)
        name = sites.identity(context).name
        try:
            # Inside the try: a task this hospital cannot load, a policy it has not
            # written or data that does not fit is a refusal with its reason.
            site = sites.site(context, instr.job)
            # This instruction carries round r - 1's aggregate: that round is committed.
            masking.purge_committed(
                site.state_dir, instr.job.job, through_round=instr.server_round - 1
            )
            sent = SentUpdates(site.state_dir)
            reply = sent.get(instr)
            reply = _replay(site, instr, reply) if reply is not None else _train(site, instr)
            sent.put(instr, reply)
        except FedvaultError as exc:
            log.warning("%s refused round %d: %s", name, instr.server_round, exc)
            count_refusal(refusal_code(exc).value)
            reply = TrainReply(
                hospital=name,
                status=ReplyStatus.REFUSED,
                reason=refusal_reason(exc),
                code=refusal_code(exc),
                delta=instr.job.privacy.delta,
            )
        return Message(reply.to_content(), reply_to=msg)

    @app.evaluate()
    def evaluate_global(msg: Message, context: Context) -> Message:
        instr = RoundInstruction.from_message(msg)
        name = sites.identity(context).name
        try:
            reply = _evaluate(sites.site(context, instr.job), instr)
        except FedvaultError as exc:
            count_refusal(refusal_code(exc).value)
            reply = EvalReply(
                hospital=name,
                status=ReplyStatus.REFUSED,
                reason=refusal_reason(exc),
                code=refusal_code(exc),
            )
        return Message(reply.to_content(), reply_to=msg)

    @app.query()
    def key_ceremony(msg: Message, context: Context) -> Message:
        return _query(sites.identity(context), msg)

    return app


def _production_app() -> ClientApp:
    from fedvault.client.kit_sites import KitSites

    return make_client_app(KitSites())


# What `flower-supernode` loads (the app's `clientapp` component).
app = _production_app()
