// The load balancer's and the notification channels' labels, Japanese and English (ops.js).
import { extend } from "/ui/i18n.js";

extend({
  ja: {
    "bal.title": "負荷分散（DRS）", "bal.mode": "動作", "bal.mode.off": "停止", "bal.mode.recommend": "推奨のみ",
    "bal.mode.automatic": "自動", "bal.threshold": "しきい値（ポイント）", "bal.save": "設定を保存",
    "bal.recommend": "推奨を表示", "bal.run": "今すぐ分散する", "bal.confirm": "{n} 台のVMをライブマイグレーションで移動します。よろしいですか？",
    "bal.pressure": "ホストの負荷（移動前 → 移動後）", "bal.moves": "推奨される移動", "bal.vm": "VM", "bal.fromto": "移動元 → 移動先",
    "bal.resource": "理由の資源", "bal.reason": "理由", "bal.res.cpu": "CPU", "bal.res.memory": "メモリ",
    "bal.held": "移動しないVM：{n} 台（アンチアフィニティ、HA予備、クールダウンなど）",
    "ntf.title": "通知（メール・Webhook・syslog）", "ntf.channel": "チャネル", "ntf.kind": "種類", "ntf.target": "宛先",
    "ntf.department": "部門", "ntf.min_severity": "最低重要度", "ntf.counts": "配信 / 失敗", "ntf.last": "最終配信",
    "ntf.kind.mail": "メール", "ntf.kind.webhook": "Webhook", "ntf.kind.syslog": "syslog",
    "ntf.all_departments": "全部門", "ntf.never": "まだありません", "ntf.ok": "成功", "ntf.failed": "失敗",
    "ntf.severity.info": "情報", "ntf.severity.warning": "警告", "ntf.severity.error": "エラー", "ntf.severity.critical": "重大",
    "ntf.test": "テスト通知を送る", "ntf.outcome": "結果", "ntf.reason": "理由",
    "ntf.outcome.delivered": "配信済み", "ntf.outcome.failed": "失敗", "ntf.outcome.skipped": "対象外",
    "ntf.none": "通知チャネルが設定されていません。kasou.toml の [notify] に mail・webhook・syslog を設定してください。",
  },
  en: {
    "bal.title": "Load balancing (DRS)", "bal.mode": "Mode", "bal.mode.off": "Off", "bal.mode.recommend": "Recommend only",
    "bal.mode.automatic": "Automatic", "bal.threshold": "Threshold (points)", "bal.save": "Save settings",
    "bal.recommend": "Show recommendations", "bal.run": "Balance now", "bal.confirm": "Move {n} VMs by live migration?",
    "bal.pressure": "Host pressure (before → after)", "bal.moves": "Recommended moves", "bal.vm": "VM", "bal.fromto": "From → to",
    "bal.resource": "Resource", "bal.reason": "Why", "bal.res.cpu": "CPU", "bal.res.memory": "Memory",
    "bal.held": "VMs not moved: {n} (anti-affinity, HA reserve, cool-down, ...)",
    "ntf.title": "Notifications (mail, webhook, syslog)", "ntf.channel": "Channel", "ntf.kind": "Kind", "ntf.target": "Receiver",
    "ntf.department": "Department", "ntf.min_severity": "Minimum severity", "ntf.counts": "Delivered / failed", "ntf.last": "Last delivery",
    "ntf.kind.mail": "Mail", "ntf.kind.webhook": "Webhook", "ntf.kind.syslog": "syslog",
    "ntf.all_departments": "all departments", "ntf.never": "none yet", "ntf.ok": "ok", "ntf.failed": "failed",
    "ntf.severity.info": "info", "ntf.severity.warning": "warning", "ntf.severity.error": "error", "ntf.severity.critical": "critical",
    "ntf.test": "Send a test notification", "ntf.outcome": "Outcome", "ntf.reason": "Why",
    "ntf.outcome.delivered": "Delivered", "ntf.outcome.failed": "Failed", "ntf.outcome.skipped": "Skipped",
    "ntf.none": "No notification channel is configured: set mail, webhook or syslog under [notify] in kasou.toml.",
  },
});
