// The maintenance windows' labels, Japanese and English (windows.js, window-report.js).
import { extend } from "/ui/i18n.js";

extend({
  ja: {
    "mw.title": "保守作業ウィンドウ（ベンダー）",
    "mw.id": "ID", "mw.vendor": "ベンダー", "mw.vms": "対象VM", "mw.span": "開始 / 終了", "mw.plan": "作業計画",
    "mw.by": "申請者 / 承認者", "mw.from": "開始日時", "mw.to": "終了日時", "mw.permissions": "許可する操作",
    "mw.perm_all": "すべて（参照・操作・コンソール）", "mw.vms_hint": "VM名をカンマ区切りで",
    "mw.request": "保守作業を申請する", "mw.submit": "申請する",
    "mw.approve": "承認", "mw.deny": "却下", "mw.revoke": "取り消し", "mw.report": "作業記録",
    "mw.state.requested": "申請中", "mw.state.approved": "承認済み", "mw.state.active": "作業中",
    "mw.state.denied": "却下", "mw.state.revoked": "取り消し", "mw.state.expired": "期限切れ",
    "mw.report_title": "保守作業の記録", "mw.stated_plan": "申請された作業計画", "mw.done": "実施された操作（監査ログ）",
    "mw.summary": "{n} 件の操作（うち拒否 {refused} 件）", "mw.signoff": "部門の確認：署名 ______________ 日付 __________",
    "mw.back": "ダッシュボードへ戻る", "role.vendor": "ベンダー", "role.manager": "部門責任者",
  },
  en: {
    "mw.title": "Vendor maintenance windows",
    "mw.id": "ID", "mw.vendor": "Vendor", "mw.vms": "VMs", "mw.span": "From / to", "mw.plan": "Work plan",
    "mw.by": "Requested / decided by", "mw.from": "From", "mw.to": "To", "mw.permissions": "Grants",
    "mw.perm_all": "everything (read, operate, console)", "mw.vms_hint": "VM names, comma-separated",
    "mw.request": "Request a maintenance window", "mw.submit": "Request",
    "mw.approve": "Approve", "mw.deny": "Deny", "mw.revoke": "Revoke", "mw.report": "Report",
    "mw.state.requested": "Requested", "mw.state.approved": "Approved", "mw.state.active": "Active",
    "mw.state.denied": "Denied", "mw.state.revoked": "Revoked", "mw.state.expired": "Expired",
    "mw.report_title": "What was done in the maintenance window", "mw.stated_plan": "Stated work plan",
    "mw.done": "Actions done (audit log)", "mw.summary": "{n} actions ({refused} refused)",
    "mw.signoff": "Signed off by the department: ______________ date: __________",
    "mw.back": "Back to the dashboard", "role.vendor": "vendor", "role.manager": "department manager",
  },
});
